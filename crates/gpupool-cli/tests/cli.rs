//! The `gpupool` command as a user runs it: trace replay (text, JSON, gzip, plot), its errors,
//! logging and the metrics flag, the bounds of its numeric flags, bench and replay on a
//! nearly full sim device, the version, help texts, colour and the JSON schema versions. One
//! test binary for the CLI.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gpupool(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpupool"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("gpupool runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A scratch directory for one test, removed when the test ends.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("gpupool-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn gzip(contents: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(contents.as_bytes()).unwrap();
    encoder.finish().unwrap()
}

/// A miss, a hit, a miss of another class and a bypass (above the 256 MiB largest class).
const SMALL_TRACE: &str = "op,id,size,stream
a,0,1000,0
f,0,1000,0
a,1,1000,0
a,2,5000,0
f,1,1000,0
f,2,5000,0
a,3,300000000,0
f,3,300000000,0
a,4,512,0
";

fn replay_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "replay",
        path.to_str().unwrap(),
        "--format",
        "json",
        "--runs",
        "2",
    ];
    args.extend_from_slice(extra);
    let output = gpupool(&args, &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON output")
}

#[test]
fn replay_reports_the_figures_of_a_trace_as_json() {
    let dir = scratch("json");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let json = replay_json(&path, &[]);
    assert_eq!(json["events"], 9);
    assert_eq!(json["backend"], "sim");
    assert_eq!(
        json["backend_allocations"], 2,
        "one page for the class blocks (1 KiB, 8 KiB, 512 B), the 300 MB request's pages"
    );
    let backend = replay_json(&path, &["--class-blocks", "backend"]);
    assert_eq!(
        backend["backend_allocations"], 4,
        "1 KiB, 8 KiB, the 300 MB request's pages, 512 B"
    );
    assert_eq!(json["hit_rate"], 0.2);
    // Three of five requests were served without a backend allocation of their own.
    assert!((json["allocation_reduction"].as_f64().unwrap() - 0.6).abs() < 1e-12);
    assert!((backend["allocation_reduction"].as_f64().unwrap() - 0.2).abs() < 1e-12);
    assert_eq!(json["peak_live_bytes"], 300_000_000);
    // The 300 MB request's pages (300 MB rounded up to 2 MiB), still mapped (free) when the
    // last request takes a 512 B block, and the class blocks' 2 MiB page.
    assert_eq!(json["peak_reserved_bytes"], 301_989_888 + (2 << 20));
    let ratio = json["peak_ratio"].as_f64().unwrap();
    assert!((ratio - 304_087_040.0 / 300_000_000.0).abs() < 1e-12);
    // From the backend, the class blocks cost their own bytes.
    assert_eq!(
        backend["peak_reserved_bytes"],
        301_989_888 + 1024 + 8192 + 512
    );
    assert!(json["ns_per_op"].as_f64().unwrap() > 0.0);
    assert_eq!(json["live_at_end"], 1);
    assert_eq!(json["runs"], 2);
    // The dated pool report rides along: its statistics agree with the figures above.
    let pool = &json["pool_report"];
    assert_eq!(pool["stats"]["totals"]["hits"], 1);
    assert_eq!(pool["stats"]["totals"]["backend_allocations"], 2);
    assert_eq!(
        pool["stats"]["totals"]["peak_reserved_bytes"],
        json["peak_reserved_bytes"]
    );
    assert_eq!(pool["health"]["status"], "NeedsAttention");
    assert!(pool["generated_at"].as_str().unwrap().ends_with('Z'));
    // Both documents say which layout they follow.
    assert_eq!(json["schema_version"], 1);
    assert_eq!(pool["schema_version"], 1);
}

#[test]
fn replay_prints_its_figures_as_text_and_reads_gzip_by_content() {
    let dir = scratch("text");
    let plain = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    // Gzip is recognised by its magic bytes, whatever the file's name.
    let compressed = write(&dir, "small.trace", &gzip(SMALL_TRACE));
    let output = gpupool(&["replay", compressed.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for expected in [
        "Events                9 (5 allocations, 4 frees, 1 live at the end)",
        "Time per operation",
        "Hit rate              20.00%",
        "Allocation reduction  60.00%",
        "Backend allocations   2 (0 bypassed the classes)",
        "Peak live (trace)     286 MiB (300,000,000 bytes)",
        "Peak reserved / live  1.014",
        "Pool Stats: 5 allocs, 20.0% hit rate, 60.0% reduction",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
    assert!(
        !stdout.contains("Pool Size Breakdown"),
        "the dashboard is asked for"
    );
    let with_dashboard = gpupool(&["replay", plain.to_str().unwrap(), "--dashboard"], &[]);
    let stdout = text(&with_dashboard.stdout);
    assert!(stdout.contains("gpupool Memory Pool Dashboard"), "{stdout}");
    assert!(
        stdout.contains("  large      -                  1"),
        "{stdout}"
    );
    let from_plain = replay_json(&plain, &[]);
    let from_gzip = replay_json(&compressed, &[]);
    for key in [
        "events",
        "hit_rate",
        "peak_live_bytes",
        "peak_reserved_bytes",
    ] {
        assert_eq!(from_plain[key], from_gzip[key], "{key}");
    }
}

#[test]
fn finer_classes_change_the_pools_figures() {
    let dir = scratch("steps");
    let path = write(&dir, "steps.csv", b"a,0,5000,0\nf,0,5000,0\na,1,6000,0\n");
    // One backend allocation per class block, so each new class shows.
    let seed = replay_json(&path, &["--class-blocks", "backend"]);
    let finer = replay_json(
        &path,
        &["--class-blocks", "backend", "--steps-per-doubling", "4"],
    );
    assert_eq!(seed["backend_allocations"], 1, "8 KiB serves both");
    assert_eq!(finer["backend_allocations"], 2, "5 KiB and 6 KiB classes");
    assert_eq!(finer["steps_per_doubling"], 4);
}

#[test]
fn malformed_traces_fail_with_the_line_and_never_panic() {
    let dir = scratch("errors");
    let mut long = String::new();
    for id in 0..20_000 {
        long.push_str(&format!("a,{id},512,0\n"));
    }
    let compressed = gzip(&long);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown.csv",
            b"a,0,10,0\nf,0,10,0\nf,7,10,0\n".to_vec(),
            "line 3: free of unknown id 7",
        ),
        (
            "op.csv",
            b"op,id,size,stream\na,0,10,0\nz,1,10,0\n".to_vec(),
            "line 3: bad op \"z\"",
        ),
        (
            "number.csv",
            b"a,0,12x,0\n".to_vec(),
            "line 1: bad size \"12x\"",
        ),
        (
            "fields.csv",
            b"a,0,10,0,9\n".to_vec(),
            "line 1: expected 4 fields",
        ),
        (
            "truncated.csv.gz",
            compressed[..compressed.len() / 2].to_vec(),
            "truncated gzip data",
        ),
    ];
    for (name, contents, expected) in cases {
        let path = write(&dir, name, &contents);
        let output = gpupool(&["replay", path.to_str().unwrap()], &[]);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{name} succeeded");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(stderr.contains(name), "{name}: the file is named: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name}: no figures on error");
    }
    let missing = gpupool(&["replay", dir.join("absent.csv").to_str().unwrap()], &[]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("cannot open"));
}

#[test]
fn replay_draws_the_memory_timeline_as_svg() {
    let dir = scratch("plot");
    let mut trace = String::new();
    for id in 0..600u64 {
        trace.push_str(&format!("a,{id},{},0\n", (id % 7 + 1) << 20));
        if id >= 50 {
            trace.push_str(&format!("f,{},{},0\n", id - 50, ((id - 50) % 7 + 1) << 20));
        }
    }
    let path = write(&dir, "plot.csv", trace.as_bytes());
    let svg = dir.join("memory.svg");
    let output = gpupool(
        &[
            "replay",
            path.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
            "--plot-every",
            "25",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("Memory timeline: "));
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawing.starts_with("<svg"),
        "{}",
        &drawing[..80.min(drawing.len())]
    );
    for label in [
        "event index",
        "bytes (MiB)",
        "reserved (held from the backend)",
        "in use (blocks of live buffers)",
        "requested live (the trace)",
        "plot.csv: memory over the trace",
    ] {
        assert!(drawing.contains(label), "{label} not drawn");
    }
    assert!(drawing.matches("<polyline").count() >= 3, "three lines");
}

#[test]
fn logs_follow_rust_log_on_stderr() {
    let dir = scratch("logs");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let quiet = gpupool(&["replay", path.to_str().unwrap(), "--runs", "1"], &[]);
    assert!(
        !text(&quiet.stderr).contains("pool miss"),
        "default is warn"
    );
    let debug = gpupool(
        &["replay", path.to_str().unwrap(), "--runs", "1"],
        &[("RUST_LOG", "gpupool=debug")],
    );
    let stderr = text(&debug.stderr);
    assert!(
        stderr.contains("pool miss: allocated from the backend"),
        "{stderr}"
    );
    assert!(
        !text(&debug.stdout).contains("pool miss"),
        "logs stay off stdout"
    );
    assert!(!stderr.contains('\u{1b}'), "no colour off a terminal");
}

#[test]
fn the_metrics_endpoint_binds_loopback_only() {
    let dir = scratch("metrics");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let served = gpupool(
        &[
            "replay",
            path.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(served.status.success(), "{}", text(&served.stderr));
    assert!(text(&served.stderr).contains("serving metrics at http://127.0.0.1:"));
    let refused = gpupool(
        &[
            "replay",
            path.to_str().unwrap(),
            "--metrics-addr",
            "0.0.0.0:0",
        ],
        &[],
    );
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("only binds loopback"));
}

#[test]
fn seed_rules_keep_large_requests_out_of_the_arena() {
    let dir = scratch("seed-rules");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let seed = replay_json(&path, &["--seed-rules"]);
    let default = replay_json(&path, &[]);
    // The 300 MB request bypasses the classes under the seed's rules; the arena serves it
    // otherwise.
    assert_eq!(seed["bypasses"], 1);
    assert_eq!(default["bypasses"], 0);
    assert_eq!(seed["peak_reserved_bytes"], 300_000_000 + 1024 + 8192);
}

/// The exit code, stderr and stdout of a run that must fail cleanly: no panic, no figures.
fn failure(args: &[&str]) -> (Option<i32>, String) {
    let output = gpupool(args, &[]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(output.stdout.is_empty(), "{args:?}: no figures on error");
    (output.status.code(), stderr)
}

#[test]
fn c1_replay_runs_out_of_range_is_a_clear_error() {
    let dir = scratch("runs");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let trace = path.to_str().unwrap();
    let cases = [
        ("--runs", "0"),
        ("--runs", "1001"),
        ("--runs", "1000000000000"),
        ("--runs", "18446744073709551615"),
        ("--runs", "18446744073709551616"),
        ("--runs", "-1"),
        ("--steps-per-doubling", "0"),
        ("--steps-per-doubling", "65"),
        ("--steps-per-doubling", "18446744073709551615"),
        ("--plot-every", "0"),
        ("--plot-every", "18446744073709551616"),
        ("--sim-capacity-bytes", "0"),
    ];
    for (flag, value) in cases {
        // `--flag=value`, so "-1" is read as the flag's value and not as a flag.
        let (code, stderr) = failure(&["replay", trace, &format!("{flag}={value}")]);
        assert_eq!(code, Some(2), "{flag} {value}: a usage error: {stderr}");
        assert!(
            stderr.contains(flag),
            "{flag} {value}: names the flag: {stderr}"
        );
    }
    // The bounds themselves are accepted (one at a time: a manager of 64 steps per doubling
    // takes a while to build in a debug build, and each run builds one).
    for (flag, value, key) in [
        ("--runs", "1000", "runs"),
        ("--steps-per-doubling", "64", "steps_per_doubling"),
    ] {
        let output = gpupool(
            &[
                "replay",
                trace,
                "--format",
                "json",
                &format!("{flag}={value}"),
            ],
            &[],
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json[key].to_string(), value);
    }
    let (code, stderr) = failure(&["bench", "--sim-capacity-bytes", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[test]
fn c2_a_trace_line_of_10_mb_fails_with_a_short_error() {
    let dir = scratch("long-line");
    // A size field of ten million digits: the old error quoted all of it.
    let mut line = b"a,0,".to_vec();
    line.resize(10 << 20, b'7');
    line.extend_from_slice(b",0\n");
    let path = write(&dir, "long.csv", &line);
    let (code, stderr) = failure(&["replay", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("line 1: line longer than 4096 bytes"),
        "{stderr}"
    );
    assert!(
        stderr.len() < 400,
        "a short message: {} bytes",
        stderr.len()
    );

    // A line under the bound with a long bad field: the message quotes its start only.
    let field = "x".repeat(3000);
    let path = write(&dir, "field.csv", format!("a,0,{field},0\n").as_bytes());
    let (_, stderr) = failure(&["replay", path.to_str().unwrap()]);
    assert!(stderr.contains("line 1: bad size \"xxx"), "{stderr}");
    assert!(stderr.contains('…'), "{stderr}");
    assert!(
        stderr.len() < 400,
        "a short message: {} bytes",
        stderr.len()
    );
}

#[test]
fn c2_a_gzip_stream_of_200_mb_of_zeros_fails_fast_with_a_short_error() {
    let dir = scratch("zeros");
    // 200 gzip members of 1 MiB of zeros each: a gzip file may hold several members, and the
    // trace reader reads them as one stream of 200 MiB without a newline. Compressing one
    // member and repeating it keeps the test's own work small.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&vec![0u8; 1 << 20]).unwrap();
    let member = encoder.finish().unwrap();
    let bomb = member.repeat(200);
    assert!(bomb.len() < 1 << 20, "{} bytes on disk", bomb.len());
    let path = write(&dir, "zeros.csv.gz", &bomb);
    let (code, stderr) = failure(&["replay", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    // Refused at the first line's bound, so nothing near 200 MiB was inflated or held.
    assert!(
        stderr.contains("line 1: line longer than 4096 bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("zeros.csv.gz"), "{stderr}");
    assert!(
        stderr.len() < 400,
        "a short message: {} bytes",
        stderr.len()
    );
}

#[test]
fn bench_allocation_failure_mid_run_is_an_error_not_a_panic() {
    // A sim device of 1.5 MiB: the workloads fit, then the 1 MiB latency row has gpupool's
    // cached 1 MiB block live when the naive pool asks for its own (this was an `expect`).
    let (code, stderr) = failure(&[
        "bench",
        "--backend",
        "sim",
        "--sim-capacity-bytes",
        "1572864",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "gpupool: bench stopped: the naive pool's allocation of 1 MiB failed: \
             device out of memory"
        ),
        "{stderr}"
    );
    // 3.5 MB: gpupool holds the 2 MiB page its 1 MiB class block was carved from and the naive
    // pool its 1 MiB block when the unpooled manager asks for a third (this was an `expect`
    // too).
    let (code, stderr) = failure(&[
        "bench",
        "--backend",
        "sim",
        "--sim-capacity-bytes",
        "3500000",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("gpupool: bench stopped: out of memory"),
        "{stderr}"
    );
    // The capacity belongs to the sim device only.
    let (code, stderr) = failure(&[
        "bench",
        "--backend",
        "host",
        "--sim-capacity-bytes",
        "1572864",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("applies to --backend sim only"), "{stderr}");
}

#[test]
fn replay_allocation_failure_names_the_trace_line() {
    let dir = scratch("capacity");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let (code, stderr) = failure(&[
        "replay",
        path.to_str().unwrap(),
        "--sim-capacity-bytes",
        "1000000",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("trace line 8: allocation of 300,000,000 bytes failed"),
        "{stderr}"
    );
}

#[test]
fn the_version_names_the_command() {
    let output = gpupool(&["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        text(&output.stdout),
        format!("gpupool {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The sentence every help text that speaks of the seed carries.
const SEED_EXPLANATION: &str =
    "\"The seed\" is the original C# Metal memory-pooling sample that gpupool reimplements";

#[test]
fn help_that_speaks_of_the_seed_says_what_it_is() {
    let mut seen = 0;
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["bench", "--help"],
        &["bench", "-h"],
        &["help", "bench"],
        &["replay", "--help"],
        &["replay", "-h"],
        &["help", "replay"],
    ] {
        let output = gpupool(args, &[]);
        assert!(output.status.success(), "{args:?}");
        let help = text(&output.stdout);
        assert!(help.contains("Usage: gpupool"), "{args:?}: {help}");
        if help.to_lowercase().contains("seed") {
            seen += 1;
            assert!(
                help.contains(SEED_EXPLANATION),
                "{args:?} speaks of the seed without saying what it is:\n{help}"
            );
        }
    }
    assert!(seen >= 6, "the seed's workloads are named in the help");
    // The bench help says what --samples and --metrics-addr do.
    let bench = text(&gpupool(&["bench", "--help"], &[]).stdout);
    for expected in [
        "--samples <SAMPLES>",
        "[default: 5]",
        "serves the statistics of the one in use at the moment of the scrape",
    ] {
        assert!(bench.contains(expected), "{expected:?} not in\n{bench}");
    }
}

/// Whether `bytes` hold an ANSI escape sequence.
fn has_escapes(bytes: &[u8]) -> bool {
    bytes.contains(&0x1b)
}

#[test]
fn color_never_writes_no_escapes_and_always_overrides_no_color() {
    let dir = scratch("color");
    let path = write(&dir, "small.csv", SMALL_TRACE.as_bytes());
    let trace = path.to_str().unwrap();
    let debug = [("RUST_LOG", "gpupool=debug")];
    // Every kind of output: a render (the dashboard), logs, help, a usage error.
    for when in ["never", "always"] {
        let replay = gpupool(
            &[
                "replay",
                trace,
                "--runs",
                "1",
                "--dashboard",
                "--color",
                when,
            ],
            &debug,
        );
        assert!(replay.status.success(), "{}", text(&replay.stderr));
        let help = gpupool(&[&format!("--color={when}"), "bench", "--help"], &[]);
        let error = gpupool(&["--color", when, "bench", "--no-such-flag"], &[]);
        assert_eq!(error.status.code(), Some(2));
        for (what, bytes) in [
            ("dashboard", &replay.stdout),
            ("logs", &replay.stderr),
            ("help", &help.stdout),
            ("usage error", &error.stderr),
        ] {
            // The test environment sets NO_COLOR: `always` wins over it, `never` always holds.
            assert_eq!(
                has_escapes(bytes),
                when == "always",
                "--color {when}, {what}:\n{}",
                text(bytes)
            );
        }
    }
    // Without the flag, output off a terminal is plain (and NO_COLOR is honoured besides).
    let plain = gpupool(&["replay", trace, "--runs", "1", "--dashboard"], &debug);
    assert!(!has_escapes(&plain.stdout) && !has_escapes(&plain.stderr));
    let (code, stderr) = failure(&["--color", "sometimes", "replay", trace]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--color"), "{stderr}");
}

#[test]
fn bench_json_has_a_schema_version_and_a_range_per_timed_figure() {
    let output = gpupool(
        &[
            "bench",
            "--backend",
            "sim",
            "--format",
            "json",
            "--samples",
            "2",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON output");
    assert_eq!(json["schema_version"], 1);
    assert_eq!(json["samples"], 2);
    assert_eq!(json["backend"], "sim");
    let ordered = |row: &serde_json::Value, key: &str| {
        let figure = |suffix: &str| row[format!("{key}{suffix}")].as_f64().unwrap();
        let (min, median, max) = (figure("_min"), figure(""), figure("_max"));
        assert!(min <= median && median <= max, "{key}: {row}");
    };
    let workloads = json["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2);
    for workload in workloads {
        for key in ["direct_ms", "pooled_ms", "naive_ms"] {
            ordered(workload, key);
        }
    }
    assert_eq!(workloads[0]["requests"], 1000);
    let latency = json["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 3);
    for row in latency {
        for key in [
            "p50_ns",
            "p99_ns",
            "naive_p50_ns",
            "naive_p99_ns",
            "direct_p50_ns",
        ] {
            ordered(row, key);
        }
    }
    let throughput = json["throughput"].as_array().unwrap();
    assert_eq!(
        throughput.len(),
        6,
        "gpupool and the naive pool, 3 thread counts"
    );
    for row in throughput {
        ordered(row, "pairs_per_second");
    }
}

#[test]
fn bench_text_uses_iec_units_separators_and_rates() {
    let output = gpupool(&["bench", "--backend", "sim", "--samples", "1"], &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    for expected in [
        "median [fastest–slowest] of 1 sample,",
        "Buffer Size: 4 KiB",
        "Buffer Sizes: 256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB",
        "  256 KiB:   500 allocs",
        "Pool after seed-mixed: 3,000 requests",
        "reserved 2.00 MiB (2.00 MiB cached)",
        " M/s [",
        "gpupool Memory Pool Dashboard",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in\n{stdout}");
    }
    for raw in ["KB", "bytes:", "349440", "pairs/s"] {
        assert!(!stdout.contains(raw), "{raw:?} in\n{stdout}");
    }
}

/// The peak is explained at the moment the pool held it with the most bytes live, not only
/// when it was raised: here a class page raises it while 1,000 bytes are live, and the next
/// request, 3 MB, lands in free pages under that same peak.
#[test]
fn the_waste_at_the_peak_is_read_when_the_most_bytes_are_live_at_it() {
    let dir = scratch("peak-moment");
    let path = write(
        &dir,
        "moment.csv",
        b"op,id,size,stream\na,0,3000000,0\nf,0,3000000,0\na,1,1000,0\na,2,3000000,0\n",
    );
    let json = replay_json(&path, &[]);
    assert_eq!(
        json["peak_reserved_bytes"],
        6 << 20,
        "two large pages and a class page"
    );
    assert_eq!(json["requested_live_at_peak"], 3_001_000);
    let waste = &json["waste_at_peak"];
    let explained: u64 = [
        "rounding_bytes",
        "class_cache_bytes",
        "fragmentation_bytes",
        "page_granularity_bytes",
        "held_for_streams_bytes",
    ]
    .iter()
    .map(|key| waste[key].as_u64().unwrap())
    .sum();
    assert_eq!(
        explained,
        (6 << 20) - 3_001_000,
        "the parts add up at that moment"
    );
}
