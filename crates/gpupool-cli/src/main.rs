//! The `gpupool` command: benchmarks (and, later, trace replay and reports).

mod backend_choice;
mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use backend_choice::BackendName;

/// gpupool: a GPU memory pool, its benchmarks and its reports.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The seed's workloads and hit-path latency, against peers in the same run.
    Bench {
        /// Backend to measure; `auto` picks CUDA, else Metal, else host.
        #[arg(long, value_enum, default_value_t = BackendName::Auto)]
        backend: BackendName,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { backend, format } => bench::run(backend).map(|report| match format {
            Format::Text => print!("{}", bench::render_text(&report)),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("the report serialises")
            ),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gpupool: {error}");
            ExitCode::FAILURE
        }
    }
}
