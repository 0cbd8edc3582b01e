//! egressd, the program: command line, configuration, policy compilation, reload, kernel routes and neighbours,
//! admin endpoint.
//! The packet engine lives in the `dataplane` crate.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod exposition;
pub mod fib;
pub mod flows;
pub mod fqdn;
pub mod gateway;
pub mod l7;
pub mod policy;
