// dashboard-check checks Grafana dashboard JSON files against Grafana's dashboard
// schema as the Grafana Foundation SDK generates it from Grafana's own definitions:
// strict decoding (an unknown field, a wrong type or a missing required field is an
// error, in the dashboard, its panels, their options and their Prometheus queries)
// and the schema's constraints.
//
//	dashboard-check FILE.json...
//
// Prints one line per file; exits 1 if any file fails.
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// failed: the SDK returns its error list typed even when it is empty.
func failed(err error) bool {
	var list cog.BuildErrors
	if errors.As(err, &list) {
		return len(list) > 0
	}
	return err != nil
}

// indented: one line per violation, with its path in the dashboard.
func indented(err error) string {
	return "\n  " + strings.ReplaceAll(err.Error(), "\n", "\n  ")
}

func check(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var d dashboard.Dashboard
	if err := d.UnmarshalJSONStrict(raw); failed(err) {
		return fmt.Errorf("not a dashboard as Grafana's schema defines it:%s", indented(err))
	}
	if err := d.Validate(); failed(err) {
		return fmt.Errorf("breaks a constraint of Grafana's schema:%s", indented(err))
	}
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-check FILE.json...")
		os.Exit(2)
	}
	// Panel options and queries are decoded by their plugin's schema.
	plugins.RegisterDefaultPlugins()
	bad := false
	for _, path := range os.Args[1:] {
		if err := check(path); err != nil {
			fmt.Printf("%s: %v\n", path, err)
			bad = true
		} else {
			fmt.Printf("%s: ok\n", path)
		}
	}
	if bad {
		os.Exit(1)
	}
}
