//! `examples/c/basic.c` compiles against the generated header and the shared library this test
//! run built, and does what it says, with the backend and configuration from the environment.
//!
//! It is built with `examples/c/build.sh` (so the script is tested too), pointed at the
//! `libgpupool_ffi.so` cargo built for this test run (in `target/<profile>/deps`, beside the
//! test binary): running cargo from inside a test would wait on the build lock. Without a C
//! compiler the test prints `skipped: no C compiler`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let works = Command::new(&cc)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    works.then_some(cc)
}

/// The directory of the `libgpupool_ffi.so` built with this test binary.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|dir| dir.join("libgpupool_ffi.so").is_file())
        .map(Path::to_path_buf);
    found.unwrap_or_else(|| panic!("no libgpupool_ffi.so beside {}", exe.display()))
}

fn build(cc: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("gpupool-c-example-{}", std::process::id()));
    let built = Command::new("bash")
        .arg(root.join("examples/c/build.sh"))
        .arg("debug")
        .env("GPUPOOL_LIB_DIR", library_dir())
        .env("OUT", &out)
        .env("CC", cc)
        .output()
        .expect("bash runs build.sh");
    assert!(
        built.status.success(),
        "build.sh failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    out.join("basic")
}

fn run(program: &Path, backend: &str, config: &str) -> Output {
    Command::new(program)
        .env("GPUPOOL_BACKEND", backend)
        .env("GPUPOOL_CONFIG", config)
        .env_remove("GPUPOOL_LOG")
        .output()
        .expect("the example runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_c_example_builds_and_runs_on_host_and_sim() {
    if !cfg!(target_os = "linux") {
        println!("skipped: the example's build script links a Linux .so");
        return;
    }
    let Some(cc) = compiler() else {
        println!("skipped: no C compiler");
        return;
    };
    let program = build(&cc);

    let host = run(
        &program,
        "host",
        "steps_per_doubling=4,max_idle_per_class=16",
    );
    let text = stdout(&host);
    assert!(
        host.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&host.stderr)
    );
    assert!(text.starts_with("backend: host\n"), "{text}");
    assert!(
        text.contains("second free of the same pointer: double free of 0x"),
        "{text}"
    );
    assert!(text.contains("allocated again: the cached block"), "{text}");
    let json = text
        .lines()
        .find_map(|line| line.strip_prefix("stats: "))
        .expect("a stats line");
    let stats: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(stats["ffi"]["double_frees"], 1);
    assert_eq!(stats["ffi"]["live_pointers"], 0);
    assert_eq!(stats["ffi"]["allocations"], 3);
    assert_eq!(stats["backend"], "host");
    assert!(text.contains("Overall Statistics"), "{text}");

    let sim = run(&program, "sim", "");
    assert!(sim.status.success());
    assert!(stdout(&sim).starts_with("backend: sim\n"));

    let bad = run(&program, "host", "steps_per_doubling=4,colour=blue");
    let text = stdout(&bad);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(
        text.contains("allocation failed: configuration: GPUPOOL_CONFIG="),
        "{text}"
    );
    assert!(text.contains("unknown key \"colour\""), "{text}");

    let _ = std::fs::remove_dir_all(program.parent().unwrap());
}
