//! The `gpupool` command: benchmarks, trace replay, the statistics dashboard and the metrics
//! endpoint.
//!
//! Logs: the library's `tracing` events go to stderr, filtered by `RUST_LOG` (default `warn`;
//! `RUST_LOG=debug` shows every pool miss, `info` the trims and OOM retries).
//!
//! Unsafe code: only [`driver_peers`] (raw CUDA driver calls, built with the `cuda` feature)
//! may hold any; `unsafe_code` is denied for the crate and allowed on that one module, and
//! every other module forbids it.
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

mod backend_choice;
mod bench;
#[cfg(feature = "cuda")]
#[allow(unsafe_code, reason = "raw driver calls, each with its SAFETY comment")]
mod driver_peers;
mod format;
mod metrics_server;
mod replay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand, ValueEnum};
use gpupool::dashboard::{self, Style};
use gpupool::telemetry;

use backend_choice::BackendName;
use metrics_server::{CurrentManager, MetricsServer};

/// The most timed replays: plenty for a stable median, and few enough that `--runs` cannot ask
/// for a replay of days or a vector of run times larger than memory.
const MAX_RUNS: u64 = 1000;
/// The finest size classes the library builds (its `SizeClasses` refuses more steps); checked
/// here as well so a bad value is a usage error naming the flag.
const MAX_STEPS_PER_DOUBLING: u64 = 64;

/// What "the seed" means, said wherever a help text uses the word.
const SEED_EXPLAINED: &str = "\"The seed\" is the original C# Metal memory-pooling sample that \
gpupool reimplements. Its workloads are the two benchmark scenarios `gpupool bench` runs: \
1,000 allocate+free pairs of 4 KiB, then 500 pairs of each of 256 B, 1 KiB, 4 KiB, 16 KiB, \
64 KiB and 256 KiB. Its rules are its pool settings: power-of-two size classes from 256 B to \
256 MiB, at most 32 idle blocks per class.";

/// gpupool: a GPU memory pool, its benchmarks and its reports.
///
/// Sizes are in IEC units (1 KiB = 1,024 bytes). Colour follows `--color`; with `auto`, the
/// default, output is coloured only on a terminal and only when `NO_COLOR` is unset or empty.
#[derive(Parser)]
#[command(name = "gpupool", version, about, long_about, after_help = SEED_EXPLAINED)]
struct Cli {
    /// When to colour the output: auto, always or never.
    ///
    /// Applies to help, errors, the dashboard and logs. `auto` colours a terminal unless
    /// `NO_COLOR` is set; `always` and `never` override `NO_COLOR`.
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "WHEN",
        default_value_t = ColorWhen::Auto
    )]
    color: ColorWhen,
    /// What to run.
    #[command(subcommand)]
    command: Command,
}

/// When output is coloured (`--color`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum ColorWhen {
    /// On a terminal, unless `NO_COLOR` is set to a non-empty value.
    #[default]
    Auto,
    /// Always, even through a pipe or with `NO_COLOR`.
    Always,
    /// Never.
    Never,
}

impl ColorWhen {
    /// The choice from the raw command line, before clap parses it, so that clap's own help and
    /// errors follow it too: the last `--color WHEN` or `--color=WHEN` before a `--`. An
    /// unknown value is left to clap to refuse.
    fn from_args(args: &[std::ffi::OsString]) -> ColorWhen {
        let mut choice = ColorWhen::Auto;
        let mut args = args.iter().skip(1).map(|arg| arg.to_str().unwrap_or(""));
        while let Some(arg) = args.next() {
            let value = match arg {
                "--" => break,
                "--color" => args.next().unwrap_or(""),
                _ => match arg.strip_prefix("--color=") {
                    Some(value) => value,
                    None => continue,
                },
            };
            if let Ok(parsed) = ColorWhen::from_str(value, false) {
                choice = parsed;
            }
        }
        choice
    }

    /// The same choice for clap's help and error output (clap's `auto` also honours
    /// `NO_COLOR`).
    fn clap(self) -> clap::ColorChoice {
        match self {
            ColorWhen::Auto => clap::ColorChoice::Auto,
            ColorWhen::Always => clap::ColorChoice::Always,
            ColorWhen::Never => clap::ColorChoice::Never,
        }
    }

    /// The style of a render written to `stream`.
    fn style(self, stream: &impl std::io::IsTerminal) -> Style {
        match self {
            ColorWhen::Auto => Style::detect(stream),
            ColorWhen::Always => Style::COLOR,
            ColorWhen::Never => Style::PLAIN,
        }
    }
}

/// The subcommands.
#[derive(Subcommand)]
enum Command {
    /// Benchmark the pool on the seed's workloads, plus hit-path latency and multi-thread
    /// throughput, against peers measured in the same run.
    ///
    /// Every timed figure is taken several times (`--samples`) and printed as the median with
    /// the fastest and slowest sample. The text output ends with the dashboard of the pool
    /// after the mixed workload.
    #[command(after_help = SEED_EXPLAINED)]
    Bench {
        /// Backend to measure; `auto` picks CUDA, else Metal, else host.
        #[arg(long, value_enum, default_value_t = BackendName::Auto)]
        backend: BackendName,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Samples of each timed figure (1 to 100); rows show the median and the range.
        ///
        /// Each sample runs on fresh managers; the text shows `median [fastest–slowest]`, the
        /// JSON `KEY`, `KEY_min` and `KEY_max`.
        #[arg(
            long,
            default_value_t = bench::DEFAULT_SAMPLES,
            value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_SAMPLES)
        )]
        samples: usize,
        /// Serve Prometheus metrics on this loopback address while the benchmark runs.
        ///
        /// For example 127.0.0.1:9464; port 0 picks one, and the address is printed on stderr.
        /// Each workload run uses a fresh manager, and the endpoint serves the statistics of
        /// the one in use at the moment of the scrape; it stops when the benchmark ends.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// Capacity of the `sim` device in bytes (default 80 GiB). Hidden: a nearly full
        /// device for the tests of the failure paths.
        #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
        sim_capacity_bytes: Option<u64>,
    },
    /// Replay an allocation trace (op,id,size,stream CSV, gzip or not) through the pool.
    #[command(after_help = SEED_EXPLAINED)]
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// Backend to allocate from.
        #[arg(long, value_enum, default_value_t = BackendName::Sim)]
        backend: BackendName,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Size-class steps per doubling (1 to 64): 1 is the seed's powers of two, 4 wastes at
        /// most 20 %.
        #[arg(
            long,
            default_value_t = 1,
            value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_STEPS_PER_DOUBLING)
        )]
        steps_per_doubling: usize,
        /// The seed's rules instead of the defaults: every request in the size classes (no
        /// large arena), 32 idle blocks per class (no byte allowance).
        #[arg(long)]
        seed_rules: bool,
        /// With virtual memory: unmap free handles before mapping past the peak (a lower peak
        /// on workloads whose block sizes change, for more driver calls).
        #[arg(long)]
        reclaim_at_peak: bool,
        /// With virtual memory, where class blocks come from: carved out of an address range
        /// of their own (`arena`), out of small pages among the large blocks
        /// (`shared-pages`), or one `cuMemAlloc` each (`backend`).
        #[arg(long, value_enum, default_value_t)]
        class_blocks: replay::ClassBlocks,
        /// Draw requested-live, in-use and reserved bytes over the trace into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Events between two samples of the plot.
        #[arg(
            long,
            default_value_t = 200,
            value_parser = RangedU64ValueParser::<usize>::new().range(1..)
        )]
        plot_every: usize,
        /// End the text output with the dashboard of the pool after the replay.
        #[arg(long)]
        dashboard: bool,
        /// Timed replays (1 to 1000), each on a fresh manager; the median time per operation
        /// is reported, with the fastest.
        #[arg(
            long,
            default_value_t = 5,
            value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_RUNS)
        )]
        runs: usize,
        /// Serve Prometheus metrics of the running replay on this loopback address.
        ///
        /// Port 0 picks one, and the address is printed on stderr.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// Capacity of the `sim` device in bytes (default 80 GiB). Hidden: a nearly full
        /// device for the tests of the failure paths.
        #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..))]
        sim_capacity_bytes: Option<u64>,
    },
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Tables for people.
    Text,
    /// One JSON document.
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`), coloured as `color` says for
/// stderr.
fn init_logging(color: ColorWhen) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let ansi = color.style(&std::io::stderr()).color;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Starts the metrics endpoint, if one was asked for, and says where it is.
fn serve_metrics(
    address: Option<SocketAddr>,
    collector: impl telemetry::prometheus_client::collector::Collector,
) -> Result<Option<MetricsServer>, String> {
    let Some(address) = address else {
        return Ok(None);
    };
    let server = MetricsServer::start(address, telemetry::registry(collector))
        .map_err(|error| format!("cannot serve metrics on {address}: {error}"))?;
    eprintln!(
        "gpupool: serving metrics at http://{}/metrics",
        server.local_addr()
    );
    Ok(Some(server))
}

/// The bench text: its tables, then the dashboard of the pool after the mixed workload.
fn bench_text(report: &bench::BenchReport, style: Style) -> String {
    let mut text = bench::render_text(report);
    if let Some(stats) = &report.final_stats {
        text.push('\n');
        text.push_str(&dashboard::render(stats, style));
    }
    text
}

/// Runs one subcommand, colouring stdout's renders with `style`; the error is the message for
/// stderr.
fn run(command: Command, style: Style) -> Result<(), String> {
    match command {
        Command::Bench {
            backend,
            format,
            samples,
            metrics_addr,
            sim_capacity_bytes,
        } => {
            // Live while the workloads run: each new manager is served as soon as it exists.
            let current = CurrentManager::default();
            let _server = serve_metrics(metrics_addr, current.clone())?;
            if metrics_addr.is_some() {
                bench::observe_managers(move |manager| current.set(manager));
            }
            let options = bench::BenchOptions {
                backend,
                samples,
                sim_capacity_bytes,
            };
            let report = bench::run(options).map_err(|error| error.to_string())?;
            match format {
                Format::Text => emit(&bench_text(&report, style)),
                Format::Json => emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&report).expect("the report serialises")
                )),
            }
            Ok(())
        }
        Command::Replay {
            trace,
            backend,
            format,
            steps_per_doubling,
            seed_rules,
            reclaim_at_peak,
            class_blocks,
            plot,
            plot_every,
            dashboard: with_dashboard,
            runs,
            metrics_addr,
            sim_capacity_bytes,
        } => {
            let current = CurrentManager::default();
            let _server = serve_metrics(metrics_addr, current.clone())?;
            let options = replay::ReplayOptions {
                trace,
                backend,
                steps_per_doubling,
                seed_rules,
                reclaim_at_peak,
                class_blocks,
                plot,
                plot_every,
                runs,
                sim_capacity_bytes,
            };
            let report = replay::run(&options, &|manager| current.set(manager))
                .map_err(|e| e.to_string())?;
            match format {
                Format::Text => {
                    emit(&replay::render_text(&report));
                    if with_dashboard {
                        let stats = &report.pool_report.stats;
                        emit(&format!("\n{}", dashboard::render(stats, style)));
                    }
                }
                Format::Json => emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&report).expect("the report serialises")
                )),
            }
            Ok(())
        }
    }
}

/// Writes to stdout; a reader that went away (`gpupool bench | head`) is not an error.
fn emit(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Parses `args` with clap's own help and errors coloured as `--color` asks.
fn parse(args: Vec<std::ffi::OsString>) -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let color = ColorWhen::from_args(&args);
    let matches = Cli::command().color(color.clap()).get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

fn main() -> ExitCode {
    let cli = parse(std::env::args_os().collect());
    init_logging(cli.color);
    match run(cli.command, cli.color.style(&std::io::stdout())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gpupool: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_text_ends_with_the_dashboard() {
        let manager = gpupool::MemoryManager::new(gpupool::backend::sim::SimBackend::default());
        for _ in 0..10 {
            drop(manager.allocate_bytes(4096).unwrap());
        }
        let stats = manager.stats();
        let report = bench::BenchReport {
            schema_version: bench::SCHEMA_VERSION,
            backend: "sim".into(),
            device: "simulated".into(),
            cpu: "test".into(),
            samples: 1,
            workloads: Vec::new(),
            latency: Vec::new(),
            throughput: Vec::new(),
            final_stats: Some(stats.clone()),
        };
        let text = bench_text(&report, Style::PLAIN);
        assert!(text.starts_with(&bench::render_text(&report)));
        assert!(text.ends_with(&dashboard::render(&stats, Style::PLAIN)));
        assert!(text.contains("Pool Size Breakdown"));
    }

    #[test]
    fn the_color_choice_is_read_before_clap_parses() {
        let choice = |args: &[&str]| {
            let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            ColorWhen::from_args(&args)
        };
        assert_eq!(choice(&["gpupool", "bench"]), ColorWhen::Auto);
        assert_eq!(
            choice(&["gpupool", "--color", "never", "bench"]),
            ColorWhen::Never
        );
        assert_eq!(
            choice(&["gpupool", "bench", "--color=always"]),
            ColorWhen::Always
        );
        assert_eq!(
            choice(&[
                "gpupool",
                "--color=never",
                "replay",
                "t",
                "--color",
                "always"
            ]),
            ColorWhen::Always,
            "the last one wins, as in clap"
        );
        assert_eq!(
            choice(&["gpupool", "replay", "--", "--color=always"]),
            ColorWhen::Auto
        );
        assert_eq!(
            choice(&["gpupool", "--color", "sometimes"]),
            ColorWhen::Auto
        );
        assert_eq!(ColorWhen::Never.style(&std::io::stdout()), Style::PLAIN);
        assert_eq!(ColorWhen::Always.style(&std::io::stdout()), Style::COLOR);
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "gpupool",
            "replay",
            "t.csv.gz",
            "--steps-per-doubling",
            "4",
            "--plot",
            "m.svg",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Replay {
                steps_per_doubling: 4,
                backend: BackendName::Sim,
                plot: Some(_),
                metrics_addr: Some(_),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["gpupool", "replay", "t", "--plot-every", "0"]).is_err());
    }
}
