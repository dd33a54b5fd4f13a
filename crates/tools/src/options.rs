//! qemu-img's command-line syntax: `-o key=value,key=value` option strings
//! (with `,,` for a literal comma) and sizes with K/M/G/T/P/E suffixes.

use crate::Error;

/// Splits `a=b,c=d` into pairs; `,,` stands for a literal comma. A key
/// without `=` (e.g. `lazy_refcounts`) means `key=on`, as in QEMU.
pub fn split_options(s: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let mut item = String::new();
    let mut chars = s.chars().peekable();
    let mut flush = |item: &mut String| -> Result<(), Error> {
        if item.is_empty() {
            return Ok(());
        }
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (item.clone(), "on".to_owned()),
        };
        if k.is_empty() {
            return Err(Error::Usage(format!("invalid option '{item}': empty name")));
        }
        out.push((k, v));
        item.clear();
        Ok(())
    };
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                item.push(',');
            } else {
                flush(&mut item)?;
            }
        } else {
            item.push(c);
        }
    }
    flush(&mut item)?;
    Ok(out)
}

/// Parses a size: a decimal number (fractions allowed) with an optional
/// suffix B, K, M, G, T, P or E (case-insensitive, powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || {
        Error::Usage(format!(
            "invalid size '{s}': expected a number with an optional K, M, G, T, P or E suffix"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num == "." {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let whole = int.checked_mul(1u64 << shift).ok_or_else(bad)?;
    let mut frac_bytes = 0u64;
    if !frac.is_empty() {
        if shift == 0 {
            return Err(Error::Usage(format!(
                "invalid size '{s}': fractional bytes"
            )));
        }
        // Exact: frac / 10^len * 2^shift, rounded down; at most 18 digits.
        if frac.len() > 18 {
            return Err(bad());
        }
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let denom = 10u128.pow(frac.len() as u32);
        frac_bytes = u64::try_from((f << shift) / denom).map_err(|_| bad())?;
    }
    let total = whole.checked_add(frac_bytes).ok_or_else(bad)?;
    if total > i64::MAX as u64 {
        return Err(Error::Usage(format!(
            "invalid size '{s}': larger than 8 EiB"
        )));
    }
    Ok(total)
}

/// Parses a boolean the way QEMU's option parser does.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::Usage(format!(
            "parameter '{key}' expects 'on' or 'off', got '{v}'"
        ))),
    }
}

/// qemu-img's way of printing a size: three significant digits and a
/// binary unit that switches at 1000 of the smaller one ("196 KiB",
/// "1.29 MiB", "0.977 MiB").
pub fn human_size(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The exponent of bytes / (1000/1024), as C's frexp would report it.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let exp = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let value = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", three_significant(value), SUFFIXES[i])
}

/// Formats like C's `%0.3g` for 0 <= v < 1000.
fn three_significant(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = v.log10().floor() as i32 + 1;
    let decimals = (3 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_with_escaped_commas() {
        let o = split_options("cluster_size=64k,backing_file=a,,b.qcow2,lazy_refcounts").unwrap();
        assert_eq!(
            o,
            vec![
                ("cluster_size".into(), "64k".into()),
                ("backing_file".into(), "a,b.qcow2".into()),
                ("lazy_refcounts".into(), "on".into()),
            ]
        );
        assert!(split_options("=x").is_err());
        assert_eq!(split_options("").unwrap(), vec![]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        for bad in [
            "",
            "1X",
            "G",
            "-1",
            "1..5G",
            "16E",
            "1.5",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_sizes_match_qemu_img() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(200_704), "196 KiB");
        assert_eq!(human_size(1_351_680), "1.29 MiB");
        assert_eq!(human_size(197_120), "192 KiB");
        assert_eq!(human_size(1000 << 10), "0.977 MiB");
    }
}
