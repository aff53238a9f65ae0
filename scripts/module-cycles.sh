#!/usr/bin/env bash
# Fails, printing the cycle, when a crate of the workspace has an import cycle
# between its modules.
#
#   scripts/module-cycles.sh                 # every library and binary of the workspace
#   scripts/module-cycles.sh tandem-proxy    # one package's
#   GRAPH=1 scripts/module-cycles.sh tandem-proxy   # also print its module graph
#
# Needs cargo-modules (`cargo install cargo-modules --version 0.27.0 --locked`, Rust
# >= 1.95) and python3. The graph is `cargo modules dependencies` with modules only:
# its "uses" edges are a module's imports and the types its items' signatures and
# fields name (an impl's methods count as their type's module's). cargo-modules' own
# `--acyclic` cannot be used: it checks items, and every method that names `Self`
# makes a cycle with its type. A module using its own ancestor is not counted: a
# module's children are part of it (h2's session is one type whose methods its
# children split by concern).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-modules >/dev/null || {
  echo "error: needs cargo-modules: cargo install cargo-modules --version 0.27.0 --locked" >&2
  exit 1
}

# Known cycles in code this check did not untie, one edge each ("from to"), ignored
# until their owners untie them; remove an edge here once it is gone.
ALLOWED_EDGES=(
  # impl From<HealthName/ProtocolName> for model types, written in source/file.rs
  "tandem_control_plane::model tandem_control_plane::source::file"
  # volumes.rs takes runner's AbortOnDrop
  "tandem::node_agent::volumes tandem::node_agent::runner"
)

# "package --lib" / "package --bin NAME" for every library and binary.
targets=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
wanted = sys.argv[1:]
for p in json.load(sys.stdin)["packages"]:
    if wanted and p["name"] not in wanted:
        continue
    for t in p["targets"]:
        if "lib" in t["kind"]:
            print(p["name"], "--lib")
        elif "bin" in t["kind"]:
            print(p["name"], "--bin", t["name"])
' "$@")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s\n' "${ALLOWED_EDGES[@]}" > "$work/allowed"

failed=0
while read -r package kind name; do
  target="$package $kind${name:+ $name}"
  # shellcheck disable=SC2086 # $name is empty for --lib
  if ! cargo modules dependencies --package "$package" $kind $name \
      --no-externs --no-sysroot --no-fns --no-types --no-traits --no-owns --layout dot \
      > "$work/graph.dot" 2> "$work/error"; then
    cat "$work/error" >&2
    echo "error: cargo modules could not read $target" >&2
    exit 1
  fi
  # `"a" -> "b" [label="uses", ...]` → `a b`, without uses of an ancestor.
  sed -n 's/^ *"\([^"]*\)" -> "\([^"]*\)" \[label="uses".*/\1 \2/p' "$work/graph.dot" \
    | awk 'index($1, $2 "::") != 1' | grep -vxF -f "$work/allowed" > "$work/edges" || true
  if [ -n "${GRAPH:-}" ]; then
    echo "== $target"
    awk '{ to[$1] = to[$1] " " $2 } END { for (m in to) print m " ->" to[m] }' "$work/edges" | sort
  fi
  if ! tsort "$work/edges" > /dev/null 2> "$work/loops"; then
    echo "error: import cycle between the modules of $target:" >&2
    awk '/input contains a loop/ { print "cycle:"; next } { sub(/^tsort: /, "  "); print }' \
      "$work/loops" >&2
    failed=1
  fi
done <<< "$targets"
[ "$failed" -eq 0 ] || exit 1
echo "no import cycles between modules ($(wc -l <<< "$targets") targets)"
