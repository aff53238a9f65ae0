//! Kubernetes resource quantities (`100m`, `1.5`, `128Mi`, `1e3`), as the API server
//! accepts them for container resources: checked here so that a bad annotation
//! leaves the pod unmeshed instead of making the API server refuse the pod.

/// The value of a non-negative quantity, in base units (cores, bytes). Precise
/// enough to compare a request with a limit.
pub fn parse(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a Kubernetes quantity (such as 100m, 0.5, 64Mi, 1G)");
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let number_len = unsigned
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = unsigned.split_at(number_len);
    if number.is_empty()
        || number == "."
        || number.matches('.').count() > 1
        || !number.bytes().any(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let digits = &exp[1..];
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let exponent: i32 = digits.parse().map_err(|_| bad())?;
            10f64.powi(exponent)
        }
        _ => return Err(bad()),
    };
    let value = value * scale;
    if !value.is_finite() {
        return Err(bad());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn accepts_what_kubernetes_accepts() {
        assert_eq!(parse("100m").unwrap(), 0.1);
        assert_eq!(parse("1").unwrap(), 1.0);
        assert_eq!(parse("0.5").unwrap(), 0.5);
        assert_eq!(parse(".5").unwrap(), 0.5);
        assert_eq!(parse("+2").unwrap(), 2.0);
        assert_eq!(parse("64Mi").unwrap(), 64.0 * 1024.0 * 1024.0);
        assert_eq!(parse("1G").unwrap(), 1e9);
        assert_eq!(parse("1e3").unwrap(), 1000.0);
        assert_eq!(parse("5E-1").unwrap(), 0.5);
        assert!(parse("128Mi").unwrap() > parse("100M").unwrap());
    }

    #[test]
    fn refuses_the_rest() {
        for bad in [
            "", "abc", "-1", "1.2.3", "10MB", "Mi", "1 Mi", ".", "1e", "1e+", "10mi", "1x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse("xyz").unwrap_err().contains("\"xyz\""));
    }
}
