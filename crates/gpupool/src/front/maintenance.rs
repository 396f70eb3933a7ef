//! Automatic maintenance: a background thread that, once per interval, releases blocks that
//! stayed idle for longer than one interval, down to each class's minimum.
//!
//! The thread holds only a `Weak` reference to the pool, so it never keeps memory alive, and
//! it works only on idle blocks under the same shard locks as requests, so it cannot race a
//! request into a leak. It stops when the last `MemoryManager` handle drops: dropping the
//! channel's sender wakes it at once.
#![forbid(unsafe_code)]

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Weak;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::pool_manager::PoolManager;

/// The running maintenance thread; dropping it stops and joins the thread.
pub(crate) struct Maintenance {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Maintenance {
    /// Starts the thread, or returns `None` when `interval` is zero.
    pub fn start(pool: Weak<PoolManager>, interval: Duration) -> Option<Maintenance> {
        if interval.is_zero() {
            return None;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gpupool-maintenance".into())
            .spawn(move || loop {
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => match pool.upgrade() {
                        Some(pool) => {
                            pool.maintain();
                        }
                        None => return,
                    },
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .ok()?;
        Some(Maintenance {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread may be the one dropping us (it upgraded the last strong reference);
            // it cannot join itself, and it exits on its own once the sender is gone.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}
