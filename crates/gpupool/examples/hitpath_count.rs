//! Instruction-count aid: a fixed number of hit-path pairs (run under callgrind).
use gpupool::{backend::host::HostBackend, MemoryManager};
fn main() {
    let manager = MemoryManager::new(HostBackend::new());
    drop(manager.allocate_bytes(4096).unwrap());
    for _ in 0..100_000 {
        let buffer = manager.allocate_bytes(std::hint::black_box(4096)).unwrap();
        std::hint::black_box(&buffer);
    }
}
