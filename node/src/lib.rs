//! The keydrop node: the HTTP edge (`keydrop serve`) and the operator's tools
//! (`keydrop sku …`, `keydrop order …`), behind the `keydrop` binary in `main.rs`.
//!
//! Layout: [`cli`] is the command line; [`config`] and [`secrets`] what a node
//! starts from; [`server`] binds, recovers and drains; [`connections`] accepts and
//! serves HTTP/1.1 connections (hyper's answers to heads it cannot parse given the
//! JSON error body) and closes them on shutdown; [`api`] the HTTP routes, one
//! file per group, with the one error type in `api/error.rs`; [`admission`] the
//! token buckets and the overload gate, fed by [`lag`]; [`platform`] the OS
//! settings (huge pages; SIGPIPE for the operator commands); [`signature`] the payment callback HMAC; [`metrics`] Prometheus;
//! [`client`] the operator commands; [`decoders`] the parsers of what clients send,
//! opened to the fuzz targets and the decoder tests.
//!
//! The modules stay private but `decoders`: what the binary and the fuzz targets use
//! is named below, so the compiler still reports code nothing reaches.

mod admission;
mod api;
mod cli;
mod client;
mod config;
mod connections;
pub mod decoders;
mod lag;
mod metrics;
mod order_slots;
mod platform;
mod secrets;
mod server;
mod signature;

pub use cli::{Cli, Command};
pub use client::{run_order, run_sku};
pub use config::{Config, LogFormat};
pub use platform::{exit_quietly_on_closed_stdout, set_transparent_huge_pages};
pub use server::run as serve;

/// The binary's allocator (`main.rs`) for the unit tests too, so that what they
/// measure (the admission buckets' memory) is what a node holds.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
