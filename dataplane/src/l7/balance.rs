//! Which endpoint of a service a connection goes to, and which endpoints are left out: the mutable half of
//! services (`crate::policy::service` is the compiled half). Sans-IO: the L7 thread passes time in and reports
//! each connection's outcome.
//!
//! - **Weights** between a route's subsets: smooth weighted round robin (as nginx does it), so 80/20 is exactly 8
//!   of every 10 connections, interleaved, not a coin toss.
//! - **Endpoints** inside a subset: round robin, or the one with the fewest connections in flight.
//! - **Outlier ejection**: consecutive failures (connect failures, `5xx` first responses) eject an endpoint for the
//!   base time × its ejection count (at most 300 s); a success resets the count of failures. The cap: at most the
//!   configured percentage of the subset's endpoints out at once, at least one, never the last healthy one. If every
//!   endpoint of a subset is out anyway (ejected through another subset), they are all used: traffic to an ejected
//!   endpoint beats none.
//!
//! State is kept per service name and endpoint address, so it survives reloads that keep them.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::Duration;

use crate::policy::service::{Balancing, CompiledService};
use crate::time::Instant;

/// Longest ejection.
const MAX_EJECTION_SECS: u64 = 300;

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    in_flight: u32,
}

#[derive(Debug, Default)]
struct ServiceState {
    /// The policy generation the per-route and per-subset cursors were made for.
    generation: u64,
    endpoints: HashMap<SocketAddrV4, EndpointState>,
    /// Per route: each destination's current weight (smooth weighted round robin).
    route_weights: Vec<Vec<i64>>,
    /// Per subset (last: every endpoint): the round-robin cursor.
    cursors: Vec<usize>,
}

/// Endpoint choice and health of every service. See the module docs.
#[derive(Debug, Default)]
pub struct Balancer {
    services: HashMap<String, ServiceState>,
    ejections: u64,
}

impl Balancer {
    pub fn new() -> Balancer {
        Balancer::default()
    }

    fn state(&mut self, service: &CompiledService, generation: u64) -> &mut ServiceState {
        if !self.services.contains_key(service.name()) {
            self.services.insert(service.name().to_string(), ServiceState::default());
        }
        let state = self.services.get_mut(service.name()).unwrap_or_else(|| unreachable!("inserted above"));
        let routes = service.spec().routes.len().max(1);
        if state.generation != generation || state.route_weights.len() != routes {
            state.generation = generation;
            state.route_weights = (0..routes).map(|r| vec![0; service.destinations(r).len()]).collect();
            state.cursors = vec![0; service.spec().subsets.len() + 1];
        }
        state
    }

    /// The subset (`None`: every endpoint) route `route` sends the next connection to.
    pub fn pick_subset(&mut self, service: &CompiledService, generation: u64, route: usize) -> Option<usize> {
        let destinations = service.destinations(route);
        let state = self.state(service, generation);
        let current = state.route_weights.get_mut(route)?;
        let total: i64 = destinations.iter().map(|d| i64::from(d.weight)).sum();
        for (d, w) in destinations.iter().zip(current.iter_mut()) {
            *w += i64::from(d.weight);
        }
        // The largest current weight; the first of equals.
        let best = (0..current.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i)))?;
        current[best] -= total;
        destinations.get(best).and_then(|d| d.subset)
    }

    /// An endpoint of `subset` for a new connection, not one of `tried`; `None` when none is left.
    pub fn pick_endpoint(
        &mut self,
        now: Instant,
        service: &CompiledService,
        generation: u64,
        subset: Option<usize>,
        tried: &[SocketAddrV4],
    ) -> Option<SocketAddrV4> {
        let members = service.members(subset);
        let endpoints = &service.spec().endpoints;
        let balancing = service.spec().balancing;
        let cursor_index = subset.unwrap_or(service.spec().subsets.len());
        let state = self.state(service, generation);
        let healthy = |state: &ServiceState, address: &SocketAddrV4| {
            state.endpoints.get(address).and_then(|e| e.ejected_until).is_none_or(|until| now >= until)
        };
        let candidates = || members.iter().map(|&i| endpoints[i].address).filter(|a| !tried.contains(a));
        let any_healthy = candidates().any(|a| healthy(state, &a));
        let usable = |state: &ServiceState, a: &SocketAddrV4| !any_healthy || healthy(state, a);
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = state.cursors.get(cursor_index).copied().unwrap_or(0);
        let mut chosen: Option<(usize, SocketAddrV4)> = None;
        for step in 0..n {
            let offset = (start + step) % n;
            let address = endpoints[members[offset]].address;
            if tried.contains(&address) || !usable(state, &address) {
                continue;
            }
            match balancing {
                Balancing::RoundRobin => {
                    chosen = Some((offset, address));
                    break;
                }
                Balancing::LeastRequest => {
                    let load = |a: &SocketAddrV4| state.endpoints.get(a).map_or(0, |e| e.in_flight);
                    if chosen.is_none_or(|(_, c)| load(&address) < load(&c)) {
                        chosen = Some((offset, address));
                    }
                }
            }
        }
        let (offset, address) = chosen?;
        if let Some(cursor) = state.cursors.get_mut(cursor_index) {
            *cursor = (offset + 1) % n;
        }
        // An endpoint whose ejection is over is back: it starts from a clean count.
        if let Some(e) = state.endpoints.get_mut(&address) {
            if e.ejected_until.is_some_and(|until| now >= until) {
                e.ejected_until = None;
                e.consecutive_failures = 0;
            }
        }
        Some(address)
    }

    /// A connection to `address` opened (counted for least-request until [`Balancer::on_closed`]).
    pub fn on_opened(&mut self, service: &str, address: SocketAddrV4) {
        if let Some(s) = self.services.get_mut(service) {
            s.endpoints.entry(address).or_default().in_flight += 1;
        }
    }

    pub fn on_closed(&mut self, service: &str, address: SocketAddrV4) {
        if let Some(e) = self.services.get_mut(service).and_then(|s| s.endpoints.get_mut(&address)) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }

    /// The endpoint answered (connected and its first response was not a `5xx`).
    pub fn on_success(&mut self, service: &str, address: SocketAddrV4) {
        if let Some(e) = self.services.get_mut(service).and_then(|s| s.endpoints.get_mut(&address)) {
            e.consecutive_failures = 0;
            if e.ejected_until.is_none() {
                e.times_ejected = 0;
            }
        }
    }

    /// The endpoint failed (connect failure or a `5xx` first response) while serving `subset`: returns whether it
    /// was ejected now.
    pub fn on_failure(
        &mut self,
        now: Instant,
        service: &CompiledService,
        subset: Option<usize>,
        address: SocketAddrV4,
    ) -> bool {
        let outlier = service.spec().outlier;
        let members = || service.members(subset).iter().map(|&i| service.spec().endpoints[i].address);
        let Some(state) = self.services.get_mut(service.name()) else { return false };
        let ejected_now = members()
            .filter(|a| state.endpoints.get(a).and_then(|e| e.ejected_until).is_some_and(|until| now < until))
            .count();
        let e = state.endpoints.entry(address).or_default();
        if e.ejected_until.is_some_and(|until| now < until) {
            return false;
        }
        e.consecutive_failures += 1;
        if outlier.consecutive_failures == 0 || e.consecutive_failures < outlier.consecutive_failures {
            return false;
        }
        let n = members().count();
        let cap = (n * outlier.max_ejection_percent as usize / 100).max(1).min(n.saturating_sub(1));
        if ejected_now >= cap {
            return false;
        }
        e.times_ejected += 1;
        let secs =
            (u64::from(outlier.base_ejection_secs) * u64::from(e.times_ejected)).min(MAX_EJECTION_SECS);
        e.ejected_until = Some(now.saturating_add(Duration::from_secs(secs)));
        e.consecutive_failures = 0;
        self.ejections += 1;
        true
    }

    /// Whether `address` of `service` is ejected at `now`.
    pub fn is_ejected(&self, now: Instant, service: &str, address: SocketAddrV4) -> bool {
        self.services
            .get(service)
            .and_then(|s| s.endpoints.get(&address))
            .and_then(|e| e.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Endpoints ejected since start.
    pub fn ejections(&self) -> u64 {
        self.ejections
    }

    /// Endpoints ejected at `now`, over every service.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.services
            .values()
            .flat_map(|s| s.endpoints.values())
            .filter(|e| e.ejected_until.is_some_and(|until| now < until))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::service::{EndpointSpec, RouteSpec, ServiceSpec, SubsetSpec, WeightedSubset};

    fn address(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new([203, 0, 113, last].into(), 443)
    }

    /// Endpoints .1 and .2 are `v1`, .3 is `v2`; one route splitting `v1`/`v2` by `weights`.
    fn service(weights: (u32, u32), balancing: Balancing) -> CompiledService {
        let endpoint = |last: u8, v: &str| EndpointSpec {
            address: address(last),
            labels: vec![("version".into(), v.into())],
        };
        let subset =
            |v: &str| SubsetSpec { name: v.into(), labels: vec![("version".into(), v.into())], tls: None };
        let endpoints = vec![endpoint(1, "v1"), endpoint(2, "v1"), endpoint(3, "v2")];
        CompiledService::new(ServiceSpec {
            subsets: vec![subset("v1"), subset("v2")],
            routes: vec![RouteSpec {
                name: "split".into(),
                methods: vec![],
                paths: vec![],
                headers: vec![],
                to: vec![
                    WeightedSubset { subset: Some(0), weight: weights.0 },
                    WeightedSubset { subset: Some(1), weight: weights.1 },
                ],
                timeout_secs: None,
            }],
            balancing,
            ..ServiceSpec::new("svc", vec!["svc.test".into()], 80, endpoints)
        })
        .unwrap()
    }

    #[test]
    fn weights_split_exactly_and_interleave() {
        let s = service((80, 20), Balancing::RoundRobin);
        let mut b = Balancer::new();
        let picks: Vec<Option<usize>> = (0..1000).map(|_| b.pick_subset(&s, 1, 0)).collect();
        assert_eq!(picks.iter().filter(|p| **p == Some(0)).count(), 800);
        assert_eq!(picks.iter().filter(|p| **p == Some(1)).count(), 200);
        // Smooth: never more than 4 `v1` in a row for 80/20.
        let longest = picks.split(|p| *p == Some(1)).map(<[_]>::len).max().unwrap();
        assert!(longest <= 4, "{longest} v1 picks in a row");
        // A new generation starts the cycle again; 1/0 sends everything to the first.
        let s = service((1, 0), Balancing::RoundRobin);
        assert!((0..10).all(|_| b.pick_subset(&s, 2, 0) == Some(0)));
    }

    #[test]
    fn round_robin_skips_tried_endpoints_and_least_request_follows_load() {
        let s = service((1, 1), Balancing::RoundRobin);
        let mut b = Balancer::new();
        let now = Instant(1);
        let picks: Vec<_> = (0..4).map(|_| b.pick_endpoint(now, &s, 1, Some(0), &[]).unwrap()).collect();
        assert_eq!(picks, [address(1), address(2), address(1), address(2)]);
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(0), &[address(1)]), Some(address(2)));
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(0), &[address(1), address(2)]), None);
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(1), &[]), Some(address(3)));

        let s = service((1, 1), Balancing::LeastRequest);
        let mut b = Balancer::new();
        let first = b.pick_endpoint(now, &s, 1, Some(0), &[]).unwrap();
        b.on_opened("svc", first);
        b.on_opened("svc", first);
        let second = b.pick_endpoint(now, &s, 1, Some(0), &[]).unwrap();
        assert_ne!(first, second);
        b.on_opened("svc", second);
        // `second` has 1 in flight, `first` 2: `second` again, and again after the cursor moved.
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(0), &[]), Some(second));
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(0), &[]), Some(second));
        b.on_closed("svc", first);
        b.on_closed("svc", first);
        assert_eq!(b.pick_endpoint(now, &s, 1, Some(0), &[]), Some(first));
    }

    #[test]
    fn consecutive_failures_eject_for_the_base_time_times_the_ejections() {
        let s = service((1, 1), Balancing::RoundRobin);
        let mut b = Balancer::new();
        let t0 = Instant::from_secs(1);
        let at = |secs: u64| t0.saturating_add(Duration::from_secs(secs));
        b.pick_endpoint(t0, &s, 1, Some(0), &[]);
        for _ in 0..4 {
            assert!(!b.on_failure(t0, &s, Some(0), address(1)));
        }
        // A success in between starts the count again.
        b.on_success("svc", address(1));
        for _ in 0..4 {
            assert!(!b.on_failure(t0, &s, Some(0), address(1)));
        }
        assert!(b.on_failure(t0, &s, Some(0), address(1)), "the fifth in a row ejects");
        assert!(b.is_ejected(at(29), "svc", address(1)));
        assert!((0..5).all(|_| b.pick_endpoint(at(29), &s, 1, Some(0), &[]) == Some(address(2))));
        // The subset's last healthy endpoint is never ejected.
        for _ in 0..10 {
            assert!(!b.on_failure(at(1), &s, Some(0), address(2)));
        }
        assert!(!b.is_ejected(at(1), "svc", address(2)));
        // Back after 30 s; the second ejection lasts 60 s.
        assert!(!b.is_ejected(at(30), "svc", address(1)));
        let back: Vec<_> = (0..2).map(|_| b.pick_endpoint(at(30), &s, 1, Some(0), &[]).unwrap()).collect();
        assert!(back.contains(&address(1)));
        b.on_success("svc", address(2));
        for _ in 0..5 {
            b.on_failure(at(31), &s, Some(0), address(1));
        }
        assert!(b.is_ejected(at(90), "svc", address(1)));
        assert!(!b.is_ejected(at(91), "svc", address(1)));
        assert_eq!(b.ejections(), 2);
    }

    #[test]
    fn a_subset_whose_endpoints_are_all_ejected_still_gets_traffic() {
        let s = service((1, 1), Balancing::RoundRobin);
        let mut b = Balancer::new();
        let t0 = Instant(1);
        b.pick_endpoint(t0, &s, 1, None, &[]);
        // Ejected while serving every endpoint (3 endpoints: one may go)...
        for _ in 0..5 {
            b.on_failure(t0, &s, None, address(3));
        }
        assert!(b.is_ejected(t0, "svc", address(3)));
        // ...is the only endpoint of `v2`: used anyway.
        assert_eq!(b.pick_endpoint(t0, &s, 1, Some(1), &[]), Some(address(3)));
        assert_eq!(b.ejected_count(t0), 1);
    }
}
