//! Pool configuration: the seed's defaults, a builder, and validation.
//!
//! Defaults are the seed's: classes from 256 B to 256 MiB in powers of two, at most 32 idle
//! blocks per class, 4 kept by a normal trim, maintenance every 60 s, no budget. Invalid
//! combinations are refused by [`PoolConfigBuilder::build`] before anything is allocated.
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::error::PoolError;
use crate::size_class::SizeClasses;

/// How the pool behaves. Build one with [`PoolConfig::builder`].
///
/// ```
/// use gpupool::PoolConfig;
/// let config = PoolConfig::builder()
///     .steps_per_doubling(4)
///     .budget_bytes(Some(1 << 30))
///     .build()
///     .unwrap();
/// assert_eq!(config.max_idle_per_class(), 32);
/// ```
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub(crate) classes: SizeClasses,
    pub(crate) max_idle_per_class: usize,
    pub(crate) min_idle_per_class: usize,
    pub(crate) maintenance_interval: Duration,
    pub(crate) budget_bytes: Option<u64>,
    pub(crate) pooling: bool,
    pub(crate) zero_on_reuse: bool,
    pub(crate) shards: usize,
    pub(crate) large_threshold_bytes: Option<usize>,
    pub(crate) max_idle_bytes_per_class: usize,
    pub(crate) virtual_memory_pages: Option<usize>,
    pub(crate) reclaim_at_peak: bool,
    pub(crate) release_idle_at_peak: bool,
    pub(crate) carve_class_blocks: bool,
    pub(crate) shared_class_pages: bool,
}

impl PoolConfig {
    /// A builder holding the seed's defaults.
    pub fn builder() -> PoolConfigBuilder {
        PoolConfigBuilder::default()
    }

    /// The size classes.
    pub fn classes(&self) -> &SizeClasses {
        &self.classes
    }
    /// At most this many idle blocks are cached per class and memory kind (more for small
    /// classes under the byte allowance, see [`PoolConfig::idle_cap`]).
    pub fn max_idle_per_class(&self) -> usize {
        self.max_idle_per_class
    }
    /// A normal trim keeps this many idle blocks per class.
    pub fn min_idle_per_class(&self) -> usize {
        self.min_idle_per_class
    }
    /// How often background maintenance runs; zero means never.
    pub fn maintenance_interval(&self) -> Duration {
        self.maintenance_interval
    }
    /// The most bytes the pool may hold from each device, if limited.
    pub fn budget_bytes(&self) -> Option<u64> {
        self.budget_bytes
    }
    /// Whether pooling starts enabled.
    pub fn pooling(&self) -> bool {
        self.pooling
    }
    /// Whether reused blocks are zeroed before they are handed out.
    pub fn zero_on_reuse(&self) -> bool {
        self.zero_on_reuse
    }
    /// Number of lock shards per class cache.
    pub fn shards(&self) -> usize {
        self.shards
    }
    /// The idle-block cap of a class of `class_bytes`: the block cap, or as many blocks as fit
    /// in the byte allowance, whichever is larger.
    pub fn idle_cap(&self, class_bytes: usize) -> usize {
        self.max_idle_per_class
            .max(self.max_idle_bytes_per_class / class_bytes.max(1))
    }

    /// A class may keep as many idle blocks as fit in this many bytes, beyond the block cap.
    pub fn max_idle_bytes_per_class(&self) -> usize {
        self.max_idle_bytes_per_class
    }

    /// Requests above this many bytes are split out of large segments; `None`: classes only.
    pub fn large_threshold_bytes(&self) -> Option<usize> {
        self.large_threshold_bytes
    }
    /// Whether large requests use the virtual-memory arena where the backend offers it, and
    /// its page size: `Some(0)` means the backend's granularity.
    pub fn virtual_memory_pages(&self) -> Option<usize> {
        self.virtual_memory_pages
    }
    /// Whether the virtual-memory arena unmaps free handles before it maps past its peak.
    pub fn reclaim_at_peak(&self) -> bool {
        self.reclaim_at_peak
    }
    /// Whether idle class blocks go back before the pool grows past its peak.
    pub fn release_idle_at_peak(&self) -> bool {
        self.release_idle_at_peak
    }
    /// Whether class blocks of device memory are carved out of virtual memory.
    pub fn carve_class_blocks(&self) -> bool {
        self.carve_class_blocks
    }
    /// Whether carved class blocks share pages with large blocks instead of an address range
    /// of their own.
    pub fn shared_class_pages(&self) -> bool {
        self.shared_class_pages
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig::builder()
            .build()
            .expect("the default configuration is valid")
    }
}

/// The most cache shards (size classes x lock shards) one device and memory kind may have.
/// Each is a cache line or two of bookkeeping made up front: 65,536 is about 16 MiB per kind
/// and device before anything is pooled, and far more than any useful configuration needs
/// (the default has 21 classes x at most 64 shards).
const MAX_CACHE_SHARDS: usize = 1 << 16;

/// Builds a [`PoolConfig`]; every setter has the seed's default.
#[derive(Clone, Debug)]
pub struct PoolConfigBuilder {
    min_class_bytes: usize,
    max_class_bytes: usize,
    steps_per_doubling: usize,
    max_idle_per_class: usize,
    min_idle_per_class: usize,
    maintenance_interval: Duration,
    budget_bytes: Option<u64>,
    pooling: bool,
    zero_on_reuse: bool,
    shards: Option<usize>,
    large_threshold_bytes: Option<usize>,
    max_idle_bytes_per_class: usize,
    virtual_memory_pages: Option<usize>,
    reclaim_at_peak: bool,
    release_idle_at_peak: bool,
    carve_class_blocks: bool,
    shared_class_pages: bool,
}

impl Default for PoolConfigBuilder {
    fn default() -> Self {
        PoolConfigBuilder {
            min_class_bytes: 256,
            max_class_bytes: 256 << 20,
            steps_per_doubling: 1,
            max_idle_per_class: 32,
            min_idle_per_class: 4,
            maintenance_interval: Duration::from_secs(60),
            budget_bytes: None,
            pooling: true,
            zero_on_reuse: false,
            shards: None,
            large_threshold_bytes: Some(1 << 20),
            virtual_memory_pages: Some(0),
            reclaim_at_peak: false,
            release_idle_at_peak: true,
            carve_class_blocks: true,
            shared_class_pages: false,
            max_idle_bytes_per_class: 4 << 20,
        }
    }
}

impl PoolConfigBuilder {
    /// Smallest class in bytes (power of two, at least 256). Default 256.
    pub fn min_class_bytes(mut self, bytes: usize) -> Self {
        self.min_class_bytes = bytes;
        self
    }
    /// Largest class in bytes (power of two); larger requests bypass the pool. Default 256 MiB.
    pub fn max_class_bytes(mut self, bytes: usize) -> Self {
        self.max_class_bytes = bytes;
        self
    }
    /// Geometric steps per doubling: 1 is the seed's powers of two, 4 wastes at most 20 %.
    pub fn steps_per_doubling(mut self, steps: usize) -> Self {
        self.steps_per_doubling = steps;
        self
    }
    /// Most idle blocks cached per class and kind; more are released on drop. Default 32.
    pub fn max_idle_per_class(mut self, blocks: usize) -> Self {
        self.max_idle_per_class = blocks;
        self
    }
    /// A class may also keep as many idle blocks as fit in this many bytes, whichever allows
    /// more (default 4 MiB): the seed's 32 blocks starve small classes (a 4 KiB class would
    /// cache only 128 KiB, and a training step that frees a few hundred such buffers then pays
    /// as many driver allocations on the next), while 4 MiB per class bounds what they hold.
    /// 0 gives the seed's pure block cap.
    pub fn max_idle_bytes_per_class(mut self, bytes: usize) -> Self {
        self.max_idle_bytes_per_class = bytes;
        self
    }
    /// Idle blocks a normal trim and maintenance keep per class. Default 4.
    pub fn min_idle_per_class(mut self, blocks: usize) -> Self {
        self.min_idle_per_class = blocks;
        self
    }
    /// Background maintenance period; `Duration::ZERO` turns it off. Default 60 s.
    pub fn maintenance_interval(mut self, interval: Duration) -> Self {
        self.maintenance_interval = interval;
        self
    }
    /// Most bytes reserved from each device; `None` for no limit (default).
    pub fn budget_bytes(mut self, budget: Option<u64>) -> Self {
        self.budget_bytes = budget;
        self
    }
    /// Whether pooling starts on (default) or off.
    pub fn pooling(mut self, enabled: bool) -> Self {
        self.pooling = enabled;
        self
    }
    /// Zero reused blocks before handing them out, so no data passes between owners.
    pub fn zero_on_reuse(mut self, enabled: bool) -> Self {
        self.zero_on_reuse = enabled;
        self
    }
    /// Lock shards per class cache (rounded up to a power of two); default: four per core,
    /// between 4 and 64.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Requests above this many bytes are served from large segments split into best-fit
    /// blocks (PyTorch's rule; far less memory than classes on real workloads); `None` keeps
    /// every request in the size classes (the seed's behaviour). Default 1 MiB. Ignored on
    /// backends with purgeable idle blocks (Metal).
    pub fn large_threshold_bytes(mut self, threshold: Option<usize>) -> Self {
        self.large_threshold_bytes = threshold;
        self
    }

    /// Where the backend offers virtual memory (CUDA's VMM, the sim with `virtual_memory`),
    /// requests above the large threshold go to one reserved address range with pages of this
    /// many bytes mapped where blocks live (`Some(0)`, the default: the backend's granularity,
    /// 2 MiB on CUDA; otherwise a multiple of it). `None` keeps the segment arena everywhere.
    pub fn virtual_memory_pages(mut self, page_bytes: Option<usize>) -> Self {
        self.virtual_memory_pages = page_bytes;
        self
    }

    /// Whether the virtual-memory arena, before it maps pages past the most it ever had mapped,
    /// first unmaps wholly free handles whose work is done (moving memory instead of growing
    /// the peak). Off by default: it lowers the peak on workloads whose block sizes change
    /// from step to step (sim: vit_varres 1.063 → 1.031, bert_serve 1.292 → 1.163 peak reserved
    /// ÷ live) at the price of many more driver calls there (5–6× the mappings).
    pub fn reclaim_at_peak(mut self, enabled: bool) -> Self {
        self.reclaim_at_peak = enabled;
        self
    }

    /// Whether, with `carve_class_blocks`, before a mapping would take the device past the
    /// most the pool ever held, idle carved class blocks worth the excess go back into the
    /// arena first (largest classes, oldest blocks first; see `pool_manager/peak_guard.rs`).
    /// On by default: idle carved blocks then never raise the peak (sim: idle class blocks
    /// were 10–35 MB of every trace's peak). Class blocks from the backend are not released
    /// this way (a `cuMemFree` synchronises the device). Off is the seed's behaviour: caches
    /// keep up to their caps whatever the device holds.
    pub fn release_idle_at_peak(mut self, enabled: bool) -> Self {
        self.release_idle_at_peak = enabled;
        self
    }

    /// Whether, where the virtual-memory arena serves device memory, class blocks are carved
    /// out of mapped pages (best fit, 512-byte alignment, an address range of their own: see
    /// [`PoolConfigBuilder::shared_class_pages`]) rather than allocated one by one from the
    /// backend (`cuMemAlloc`, a driver call per block). On by default: a class miss then
    /// costs a driver call only when a page must be mapped (H200, gpt2_train: 164 mappings,
    /// 6.1 ms, instead of 532 `cuMemAlloc`, 42 `cuMemFree` and 136 mappings, 8.1 ms), idle
    /// class blocks go back before the pool grows past its peak (`release_idle_at_peak`), and
    /// the peak ÷ live was lower or within 0.05 % on all nine traces (BENCHMARKS.md, session
    /// 19). Small blocks are counted at page granularity, as the peers count theirs. Without
    /// an arena, class blocks always come from the backend.
    pub fn carve_class_blocks(mut self, enabled: bool) -> Self {
        self.carve_class_blocks = enabled;
        self
    }

    /// Whether carved class blocks share pages with large blocks (*small pages* set aside in
    /// the large blocks' address range, see `pools/vm_arena/small_pages.rs`) instead of an
    /// address range of their own, as PyTorch keeps small blocks in segments of their own.
    /// Off by default. Sharing lets a page move between small and large blocks with no driver
    /// call, which suits generation with a growing cache (sim, peak ÷ live: gpt2_medium_generate
    /// 1.042 → 1.003, gpt2_generate 1.062 → 1.041), but a small block left between large ones
    /// keeps them from merging (resnet50 bf16 1.013 → 1.027, bert 1.216 → 1.260).
    pub fn shared_class_pages(mut self, enabled: bool) -> Self {
        self.shared_class_pages = enabled;
        self
    }

    /// Checks the settings and builds the configuration.
    pub fn build(self) -> Result<PoolConfig, PoolError> {
        let classes = SizeClasses::new(
            self.min_class_bytes,
            self.max_class_bytes,
            self.steps_per_doubling,
        )?;
        if self.max_idle_per_class == 0 {
            return Err(PoolError::InvalidConfig(
                "max_idle_per_class must be at least 1 (turn pooling off instead)".into(),
            ));
        }
        if self.min_idle_per_class > self.max_idle_per_class {
            return Err(PoolError::InvalidConfig(format!(
                "min_idle_per_class {} exceeds max_idle_per_class {}",
                self.min_idle_per_class, self.max_idle_per_class
            )));
        }
        if self.budget_bytes == Some(0) {
            return Err(PoolError::InvalidConfig(
                "a budget of 0 bytes can serve nothing".into(),
            ));
        }
        let shards = match self.shards {
            Some(shards) if shards == 0 || shards > 1024 => {
                return Err(PoolError::InvalidConfig(format!(
                    "shards must be between 1 and 1024, not {shards}"
                )))
            }
            Some(shards) => shards,
            // Four shards per core keep threads that share a core from sharing a lock.
            None => (std::thread::available_parallelism().map_or(1, |cores| cores.get()) * 4)
                .next_power_of_two()
                .clamp(4, 64),
        };
        let cache_shards = classes.len().saturating_mul(shards.next_power_of_two());
        if cache_shards > MAX_CACHE_SHARDS {
            return Err(PoolError::InvalidConfig(format!(
                "{} size classes x {} lock shards make {cache_shards} cache shards per device and \
                 memory kind, more than {MAX_CACHE_SHARDS}: use fewer steps_per_doubling, a \
                 smaller max_class_bytes or fewer shards",
                classes.len(),
                shards.next_power_of_two()
            )));
        }
        if self.large_threshold_bytes == Some(0) {
            return Err(PoolError::InvalidConfig(
                "large_threshold_bytes of 0 would send every request to the large arena; use a \
                 positive threshold or None"
                    .into(),
            ));
        }
        Ok(PoolConfig {
            classes,
            max_idle_per_class: self.max_idle_per_class,
            min_idle_per_class: self.min_idle_per_class,
            maintenance_interval: self.maintenance_interval,
            budget_bytes: self.budget_bytes,
            pooling: self.pooling,
            zero_on_reuse: self.zero_on_reuse,
            shards,
            large_threshold_bytes: self.large_threshold_bytes,
            max_idle_bytes_per_class: self.max_idle_bytes_per_class,
            virtual_memory_pages: self.virtual_memory_pages,
            reclaim_at_peak: self.reclaim_at_peak,
            release_idle_at_peak: self.release_idle_at_peak,
            carve_class_blocks: self.carve_class_blocks,
            shared_class_pages: self.shared_class_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let config = PoolConfig::default();
        assert_eq!(config.classes().len(), 21);
        assert_eq!(config.classes().sizes()[0], 256);
        assert_eq!(config.classes().max_bytes(), 256 << 20);
        assert_eq!(config.max_idle_per_class(), 32);
        assert_eq!(config.min_idle_per_class(), 4);
        assert_eq!(config.maintenance_interval(), Duration::from_secs(60));
        assert!(config.pooling());
        assert!(config.shards().is_power_of_two());
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let bad = [
            PoolConfig::builder().max_idle_per_class(0),
            PoolConfig::builder().min_idle_per_class(40),
            PoolConfig::builder().budget_bytes(Some(0)),
            PoolConfig::builder().shards(0),
            PoolConfig::builder().min_class_bytes(300),
            PoolConfig::builder().steps_per_doubling(0),
        ];
        for builder in bad {
            assert!(matches!(builder.build(), Err(PoolError::InvalidConfig(_))));
        }
    }

    /// The configuration fuzzer built 13 million cache shards (gigabytes of bookkeeping) from
    /// max_class_bytes 2^63, 64 steps per doubling and 1,024 shards; now a clear error.
    #[test]
    fn a_configuration_of_millions_of_cache_shards_is_refused() {
        let huge = PoolConfig::builder()
            .max_class_bytes(1 << 63)
            .steps_per_doubling(64)
            .shards(1024)
            .build();
        let Err(PoolError::InvalidConfig(message)) = huge else {
            panic!("built: {huge:?}");
        };
        assert!(message.contains("cache shards"), "{message}");
        let largest_useful = PoolConfig::builder()
            .steps_per_doubling(4)
            .shards(64)
            .build();
        assert!(largest_useful.is_ok(), "{largest_useful:?}");
    }
}
