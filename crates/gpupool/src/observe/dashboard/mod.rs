//! Seeing what the pool holds, how well it works and what to change.
//!
//! Everything here renders a [`PoolStats`](crate::PoolStats) snapshot and nothing else: it never locks the pool
//! or reads a clock, so it can run anywhere, on a snapshot from any time, and gives the same
//! text for the same snapshot. Figures are docs/design.md's, as the snapshot computes them; the judgements
//! built on them each live in one file with their rule written down:
//!
//! - [`render()`]: the terminal dashboard, in the seed's sections, within 80 columns;
//! - [`summary()`]: the one-line summary for logs;
//! - [`PoolReport`]: the dated report, as text, or as JSON with the `json` feature;
//! - [`class_efficiency`] and [`StarRating`]: the per-class score (one 0–100 scale) and the
//!   seed's star rating of the allocation reduction;
//! - [`HealthAssessment`]: the seed's health rule, extended with memory pressure and efficiency;
//! - [`recommendations()`]: each fires only when its condition holds and names class and action;
//! - [`Style`]: colour only on a terminal and only without `NO_COLOR`.
//!
//! The number formatting they share (binary byte units, class labels, percentages, thousands
//! separators, dates) is private: it is presentation, not API.
//!
//! ```
//! use gpupool::backend::sim::SimBackend;
//! use gpupool::dashboard::{self, Health, HealthAssessment};
//! use gpupool::MemoryManager;
//!
//! let manager = MemoryManager::new(SimBackend::default());
//! for _ in 0..1000 {
//!     drop(manager.allocate_bytes(4096).unwrap());
//! }
//! let stats = manager.stats();
//! assert_eq!(HealthAssessment::of(&stats.totals).status, Health::Healthy);
//! assert!(dashboard::recommendations(&stats).is_empty());
//! ```
#![forbid(unsafe_code)]

mod format;
pub mod health;
pub mod recommendations;
mod render;
mod report;
mod score;
mod style;
mod summary;

pub use health::{Health, HealthAssessment};
pub use recommendations::{recommendations, ClassRef, Recommendation};
pub use render::{mean_efficiency, render, BAR_WIDTH, DISTRIBUTION_ROWS, WIDTH};
pub use report::{ClassScore, PoolReport, RecommendationEntry};
pub use score::{class_efficiency, StarRating};
pub use style::Style;
pub use summary::summary;
