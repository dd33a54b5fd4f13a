//! What the benchmark programs in `src/bin` share: their command line
//! (`--qblk PATH [--baseline PATH] [--runtime S] [--rounds N]`, as `cargo
//! xtask bench-log` and `bench-guest` pass it) and the median of rounds.

use std::path::PathBuf;

/// A benchmark program's options.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// The qblk binary to measure.
    pub qblk: PathBuf,
    /// Another qblk binary to measure beside it (`--baseline`), where the
    /// program takes one.
    pub baseline: Option<PathBuf>,
    /// Seconds a run.
    pub runtime: u64,
    pub rounds: usize,
}

impl BenchArgs {
    /// Parses the process's arguments for program `name`, with these
    /// defaults; `--baseline` only if `baseline` says it is taken. A bad
    /// command line ends the process with the usage (exit status 2).
    pub fn from_env(name: &str, runtime: u64, rounds: usize, baseline: bool) -> Self {
        Self::parse(std::env::args().skip(1), runtime, rounds, baseline).unwrap_or_else(|e| {
            let b = if baseline { " [--baseline PATH]" } else { "" };
            eprintln!("{name}: {e}\nusage: {name} --qblk PATH{b} [--runtime S] [--rounds N]");
            std::process::exit(2);
        })
    }

    fn parse(
        mut args: impl Iterator<Item = String>,
        runtime: u64,
        rounds: usize,
        baseline: bool,
    ) -> Result<Self, String> {
        let mut o = BenchArgs {
            qblk: PathBuf::new(),
            baseline: None,
            runtime,
            rounds,
        };
        while let Some(a) = args.next() {
            let mut value = || args.next().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--qblk" => o.qblk = value()?.into(),
                "--baseline" if baseline => o.baseline = Some(value()?.into()),
                "--runtime" => {
                    o.runtime = value()?.parse().map_err(|e| format!("--runtime: {e}"))?;
                }
                "--rounds" => o.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if o.qblk.as_os_str().is_empty() {
            return Err("--qblk is required".into());
        }
        if o.runtime == 0 || o.rounds == 0 {
            return Err("--runtime and --rounds must be positive".into());
        }
        Ok(o)
    }
}

/// The median of the rounds' figures (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
