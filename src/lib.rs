//! egressd, the program: command line, configuration, policy compilation, reload, admin endpoint, L7 path.
//! The packet engine lives in the `dataplane` crate.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod fib;
pub mod gateway;
pub mod policy;
