//! The compiled L3/L4 policy: an immutable [`PolicySnapshot`] that judges the first packet of a flow.
//!
//! This module owns the policy's *meaning* at packet time. The `egressd` crate validates the TOML model and
//! feeds it through [`PolicyBuilder`]; workers only ever see finished snapshots, published by atomic pointer swap
//! in a [`SharedPolicy`] and loaded once per batch, so a reload never blocks or stalls a worker.
//!
//! # Semantics (the one precedence rule)
//! 1. The source address selects a group: the group owning the longest source prefix that contains it. No group
//!    → `Deny(NoGroup)`.
//! 2. Among that group's rules whose protocol and port match the packet and one of whose `to` prefixes contains
//!    the destination (and none of whose `except` prefixes does), the rule with the most specific (longest)
//!    matching `to` prefix decides; ties go to the rule written first (lowest [`RuleId`]). No such rule →
//!    `Deny(DefaultDeny)`.
//! 3. Protocol: `tcp` (6), `udp` (17), `icmp` (1 and 58), `any` (every protocol). A rule with ports matches only
//!    TCP and UDP packets whose destination port is in one of its ranges (`any` + ports = TCP and UDP).
//! 4. Dry run: with the global switch, or on the deciding rule, a deny is reported with `dry_run = true`: the
//!    flow is forwarded and counted as "would deny". On an `l7` verdict `dry_run` tells the L7 path to let host
//!    mismatches through the same way. An allow never carries `dry_run`.
//!
//! # How it is compiled
//! Per group and family, every `to` and `except` prefix of the group's rules goes into one longest-prefix-match
//! table ([`lpm`]). The prefixes containing an address are exactly the ancestors of the longest one, so each
//! table leaf can precompute the group's candidate rules for its region, sorted by precedence. Each candidate
//! list (interned: equal lists share one leaf) is then "painted" into per-protocol port run tables: for every
//! port, the first candidate in precedence order that matches it. A /16 tcp:443 rule therefore still beats a /24
//! udp rule for a tcp:443 packet: the udp rule never paints TCP ports. A lookup is two trie walks (source, then
//! destination; IPv4 sources take one read up to /16 and at most 4, destinations at most 5, or 4 in tables of
//! 2048+ prefixes), one leaf read, and a binary search over the leaf's port runs (a handful of entries), each run
//! carrying its rule's outcome; the work does not grow with the number of rules (only the cache
//! footprint does), and nothing allocates.

mod host;
pub mod l7;
pub mod lpm;
pub mod service;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

pub use host::{HostPattern, HostPatternError};
use lpm::LpmTable;

use crate::drop::DropReason;
use crate::wire::ip_proto;

/// The live policy, shared by the reloader (writer) and the workers (readers).
pub type SharedPolicy = arc_swap::ArcSwap<PolicySnapshot>;

/// A [`SharedPolicy`] holding `snapshot`.
pub fn shared(snapshot: PolicySnapshot) -> SharedPolicy {
    arc_swap::ArcSwap::new(Arc::new(snapshot))
}

/// A source group, by index in the order groups were added (the order of `[[group]]` tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// A rule, by index in the order rules were added (the order of `[[rule]]` tables in the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

/// The policy's answer for the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The source's group, if any.
    pub group: Option<GroupId>,
    /// The deciding rule, if any (none for `NoGroup` and `DefaultDeny`).
    pub rule: Option<RuleId>,
    /// The verdict would deny, but the flow is to be forwarded anyway and counted as such. On `L7`: the L7 path
    /// lets host mismatches through the same way.
    pub dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward (translate and track).
    Allow,
    /// Hand the flow to the L7 path, which checks the host names of the deciding rule.
    L7,
    Deny(DenyReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The source is in no group.
    NoGroup,
    /// No rule of the group matched.
    DefaultDeny,
    /// A `deny` rule decided.
    Rule,
}

impl DenyReason {
    /// The drop counter this denial is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            DenyReason::NoGroup => DropReason::NoGroup,
            DenyReason::DefaultDeny => DropReason::DefaultDeny,
            DenyReason::Rule => DropReason::PolicyDeny,
        }
    }
}

impl Decision {
    /// Whether an L4 flow is forwarded: allowed, or denied in dry run. (`L7` flows go to the L7 path instead.)
    pub fn forwards(&self) -> bool {
        match self.verdict {
            Verdict::Allow => true,
            Verdict::Deny(_) => self.dry_run,
            Verdict::L7 => false,
        }
    }

    /// The drop reason when the flow is dropped at L4 (`None` when allowed, dry-run, or sent to the L7 path).
    pub fn drop_reason(&self) -> Option<DropReason> {
        match self.verdict {
            Verdict::Deny(reason) if !self.dry_run => Some(reason.drop_reason()),
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::L7 => "l7",
            Verdict::Deny(DenyReason::NoGroup) => "deny (no group)",
            Verdict::Deny(DenyReason::DefaultDeny) => "deny (default deny)",
            Verdict::Deny(DenyReason::Rule) => "deny (rule)",
        })
    }
}

/// What a rule does with the traffic it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Check host names on the L7 path.
    L7,
}

/// Which protocols a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtoMatch {
    Any,
    Tcp,
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

impl ProtoMatch {
    /// Whether a packet of IP protocol `proto` matches.
    pub fn matches(self, proto: u8) -> bool {
        match self {
            ProtoMatch::Any => true,
            ProtoMatch::Tcp => proto == ip_proto::TCP,
            ProtoMatch::Udp => proto == ip_proto::UDP,
            ProtoMatch::Icmp => proto == ip_proto::ICMP || proto == ip_proto::ICMPV6,
        }
    }

    /// Whether some protocol matches both.
    pub fn overlaps(self, other: ProtoMatch) -> bool {
        self == ProtoMatch::Any || other == ProtoMatch::Any || self == other
    }
}

/// An inclusive destination port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// An IP prefix with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix is invalid; `Display` is a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixError {
    Syntax(String),
    TooLong { len: u32, max: u8 },
    HostBitsSet { network: Prefix },
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::Syntax(s) => {
                write!(f, "\"{s}\" is not an IP prefix (expected ADDRESS/LENGTH or ADDRESS)")
            }
            PrefixError::TooLong { len, max } => write!(f, "prefix length /{len} is longer than /{max}"),
            PrefixError::HostBitsSet { network } => {
                write!(f, "host bits are set after the prefix length (did you mean {network}?)")
            }
        }
    }
}

impl std::error::Error for PrefixError {}

impl Prefix {
    /// A prefix; rejects lengths beyond the family's width and addresses with host bits set.
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let max = family_bits(addr) as u8;
        if len > max {
            return Err(PrefixError::TooLong { len: len.into(), max });
        }
        let network = Prefix { addr: mask(addr, len), len };
        if network.addr != addr {
            return Err(PrefixError::HostBitsSet { network });
        }
        Ok(network)
    }

    /// A prefix with host bits cleared.
    pub fn truncating(addr: IpAddr, len: u8) -> Prefix {
        let len = len.min(family_bits(addr) as u8);
        Prefix { addr: mask(addr, len), len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The address as a right-aligned integer (IPv4 in the low 32 bits).
    fn key(&self) -> u128 {
        addr_key(self.addr)
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && mask(addr, self.len) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// `ADDRESS/LENGTH`, or a bare address meaning a host prefix (/32 or /128).
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let syntax = || PrefixError::Syntax(s.to_string());
        match s.split_once('/') {
            None => {
                let addr: IpAddr = s.parse().map_err(|_| syntax())?;
                Ok(Prefix { addr, len: family_bits(addr) as u8 })
            }
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                let len: u32 = len.parse().unwrap_or(u32::MAX);
                let max = family_bits(addr) as u8;
                if len > u32::from(max) {
                    return Err(PrefixError::TooLong { len, max });
                }
                Prefix::new(addr, len as u8)
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn family_bits(addr: IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn addr_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// One rule as handed to the builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub group: GroupId,
    /// Destinations (either family).
    pub to: Vec<Prefix>,
    /// Destinations removed from `to`.
    pub except: Vec<Prefix>,
    pub proto: ProtoMatch,
    /// Destination port ranges; empty = every port (and every protocol of `proto`).
    pub ports: Vec<PortRange>,
    pub action: Action,
    /// Report denials of this rule as dry run (forwarded and counted).
    pub dry_run: bool,
    /// For `Action::L7`: the names the L7 path lets through.
    pub hosts: Vec<HostPattern>,
    /// The rule's name in metrics, audit lines and `explain` (its position when it has none).
    pub name: Option<String>,
    /// For `Action::L7`: what every request (methods, paths, headers) and every ClientHello (TLS version) must
    /// also meet.
    pub l7: l7::L7Conditions,
}

impl RuleSpec {
    /// A rule with no `except` prefixes, no host names, and no dry run.
    pub fn new(
        group: GroupId,
        to: Vec<Prefix>,
        proto: ProtoMatch,
        ports: Vec<PortRange>,
        action: Action,
    ) -> RuleSpec {
        RuleSpec {
            group,
            to,
            except: Vec::new(),
            proto,
            ports,
            action,
            dry_run: false,
            hosts: Vec::new(),
            name: None,
            l7: l7::L7Conditions::default(),
        }
    }

    /// Whether the rule's protocol and ports match a packet (destinations aside).
    pub fn matches_proto_port(&self, proto: u8, dst_port: u16) -> bool {
        self.proto.matches(proto)
            && (self.ports.is_empty()
                || ((proto == ip_proto::TCP || proto == ip_proto::UDP)
                    && self.ports.iter().any(|r| r.contains(dst_port))))
    }

    /// The most specific `to` prefix containing `dst`, unless an `except` prefix contains it.
    pub fn matching_prefix(&self, dst: IpAddr) -> Option<Prefix> {
        if self.except.iter().any(|e| e.contains(dst)) {
            return None;
        }
        self.to.iter().filter(|p| p.contains(dst)).max_by_key(|p| p.len).copied()
    }
}

/// Why a builder refused its input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("unknown group id {0:?}")]
    UnknownGroup(GroupId),
    #[error("source prefix {prefix} is in two groups ({first:?} and {second:?})")]
    SourceInTwoGroups { prefix: Prefix, first: GroupId, second: GroupId },
    #[error("too many groups or rules for the table format")]
    TooLarge,
    #[error("rule {0}: {1}")]
    L7Conditions(u32, String),
    #[error("{0}")]
    Services(String),
}

struct GroupSpec {
    name: String,
    egress_ips: Vec<Ipv4Addr>,
    port_limit: Option<u32>,
}

/// Assembles a policy and compiles it into a [`PolicySnapshot`]. Used by the `egressd` crate (from the validated
/// TOML model), by tests and by benchmarks.
#[derive(Default)]
pub struct PolicyBuilder {
    groups: Vec<GroupSpec>,
    sources: Vec<(Prefix, GroupId)>,
    rules: Vec<RuleSpec>,
    services: Vec<service::ServiceSpec>,
    dry_run: bool,
}

impl PolicyBuilder {
    /// Adds a service (see [`service`]): where requests for its hosts on its port go.
    pub fn add_service(&mut self, spec: service::ServiceSpec) -> &mut Self {
        self.services.push(spec);
        self
    }

    pub fn new() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// The global dry-run switch (`[policy] dry_run`): every denial is forwarded and counted.
    pub fn dry_run(&mut self, on: bool) -> &mut Self {
        self.dry_run = on;
        self
    }

    /// Adds a group; ids are given in order from 0.
    pub fn add_group(&mut self, name: impl Into<String>, egress_ips: Vec<Ipv4Addr>) -> GroupId {
        self.groups.push(GroupSpec { name: name.into(), egress_ips, port_limit: None });
        GroupId(self.groups.len() as u32 - 1)
    }

    /// Caps the NAT ports (mappings) `group` may hold on each of its egress IPs, so that one group sharing an
    /// egress IP with others cannot take all its ports.
    pub fn group_port_limit(&mut self, group: GroupId, limit: u32) -> &mut Self {
        if let Some(g) = self.groups.get_mut(group.0 as usize) {
            g.port_limit = Some(limit);
        }
        self
    }

    /// Puts source `prefix` in `group`. Nested prefixes in different groups resolve by longest match; the very same
    /// prefix in two groups is refused by [`build`](Self::build).
    pub fn add_source(&mut self, group: GroupId, prefix: Prefix) -> &mut Self {
        self.sources.push((prefix, group));
        self
    }

    /// Adds a rule; ids are given in order from 0, and earlier rules win ties.
    pub fn add_rule(&mut self, rule: RuleSpec) -> RuleId {
        self.rules.push(rule);
        RuleId(self.rules.len() as u32 - 1)
    }

    /// Compiles the tables. `generation` identifies the snapshot (the reloader passes the previous one + 1).
    pub fn build(self, generation: u64) -> Result<PolicySnapshot, BuildError> {
        if self.groups.len() >= lpm::MAX_VALUE as usize || self.rules.len() >= NO_RULE as usize {
            return Err(BuildError::TooLarge);
        }
        let group_count = self.groups.len() as u32;
        let check_group =
            |g: GroupId| if g.0 < group_count { Ok(()) } else { Err(BuildError::UnknownGroup(g)) };

        // Sources: value = group index + 1 (0 = no group).
        let mut seen: HashMap<Prefix, GroupId> = HashMap::new();
        let (mut src_v4, mut src_v6) = (Vec::new(), Vec::new());
        for &(prefix, group) in &self.sources {
            check_group(group)?;
            match seen.insert(prefix, group) {
                Some(first) if first != group => {
                    return Err(BuildError::SourceInTwoGroups { prefix, first, second: group });
                }
                Some(_) => continue,
                None => {}
            }
            let entry = (prefix.key(), prefix.len, group.0 + 1);
            if prefix.is_ipv4() {
                src_v4.push(entry);
            } else {
                src_v6.push(entry);
            }
        }
        for rule in &self.rules {
            check_group(rule.group)?;
        }

        let mut compiler = LeafCompiler::new(&self.rules, self.groups.len(), self.dry_run);
        let mut groups = Vec::with_capacity(self.groups.len());
        for (index, spec) in self.groups.into_iter().enumerate() {
            let group = GroupId(index as u32);
            let dest_v4 = compiler.group_table(group, true);
            let dest_v6 = compiler.group_table(group, false);
            let mut group = CompiledGroup::new(spec.name, spec.egress_ips, dest_v4, dest_v6);
            group.port_limit = spec.port_limit;
            groups.push(group);
        }
        let LeafCompiler { leaves, runs, .. } = compiler;
        let l7 = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (!r.l7.is_empty())
                    .then(|| {
                        l7::CompiledL7::new(&r.l7).map_err(|e| BuildError::L7Conditions(i as u32 + 1, e))
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let services = service::ServiceTable::new(self.services).map_err(BuildError::Services)?;
        Ok(PolicySnapshot {
            generation,
            dry_run: self.dry_run,
            // Every new flow starts with this lookup: a 16-bit root (256 KiB, once per snapshot) answers sources
            // of /16 or shorter in one read.
            sources_v4: LpmTable::build_with_root(32, &src_v4, 0, 16),
            sources_v6: LpmTable::build(128, &src_v6, 0),
            source_prefixes: seen.len(),
            groups,
            specs: self.rules,
            l7,
            services,
            leaves,
            runs,
        })
    }
}

/// "No rule" in port runs and leaf slots.
const NO_RULE: u32 = u32::MAX;

/// The run of no rule (default deny).
const NO_RUN: PortRun = PortRun { first_port: 0, outcome: NO_OUTCOME, rule: NO_RULE };

/// A run of destination ports decided by one rule, from `first_port` up to the next run's first port. It carries
/// the rule's outcome in what would be padding, so the lookup ends here instead of reading the rule's entry too
/// (one dependent cache miss fewer at 100 000 rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PortRun {
    first_port: u16,
    outcome: Outcome,
    rule: u32,
}

/// What the deciding rule does: its action, and its own dry-run flag or the global one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Outcome {
    action: Action,
    dry_run: bool,
}

/// The outcome stored with [`NO_RULE`] (never read: no rule means default deny).
const NO_OUTCOME: Outcome = Outcome { action: Action::Deny, dry_run: false };

/// The port runs of one protocol class in a leaf. A single run (the common case: port-less rules, default deny)
/// is stored inline and costs no further read; otherwise this is a slice of [`PolicySnapshot::runs`].
#[derive(Clone, Copy, Debug)]
struct RunSlice {
    /// Inline: the rule (or [`NO_RULE`]); otherwise the first run's index.
    start: u32,
    /// Number of runs minus one (a slice has 1 to 65 536 runs); 0 = inline.
    extra: u16,
    /// Inline: the rule's outcome.
    outcome: Outcome,
}

/// What a destination region decides, per protocol class ([`PROTO_CLASS`]: TCP, UDP, ICMP/ICMPv6, any other).
/// ICMP and other protocols have a single, inline run (ports play no part; only `any` rules without ports match
/// other protocols). 32 bytes, aligned so that a leaf never straddles two cache lines.
#[derive(Clone, Copy, Debug)]
#[repr(align(32))]
struct DestLeaf {
    classes: [RunSlice; 4],
}

/// The index in [`DestLeaf::classes`] of protocol `proto`.
#[inline(always)]
fn proto_class(proto: u8) -> usize {
    usize::from(PROTO_CLASS[usize::from(proto)] & 3)
}

/// Protocol number → index in [`DestLeaf::classes`]: a table read instead of branches that a mix of TCP and UDP
/// flows would mispredict.
static PROTO_CLASS: [u8; 256] = {
    let mut table = [3u8; 256];
    table[ip_proto::TCP as usize] = 0;
    table[ip_proto::UDP as usize] = 1;
    table[ip_proto::ICMP as usize] = 2;
    table[ip_proto::ICMPV6 as usize] = 2;
    table
};

/// Turns the group's prefixes into tables whose leaves are interned [`DestLeaf`]s.
struct LeafCompiler<'a> {
    rules: &'a [RuleSpec],
    /// The global dry-run switch, folded into each run's outcome.
    dry_run: bool,
    /// Rule ids of each group, by group index.
    rules_by_group: Vec<Vec<u32>>,
    leaves: Vec<DestLeaf>,
    runs: Vec<PortRun>,
    /// Candidate list (rule ids in precedence order, two or more) → leaf index.
    interned: HashMap<Vec<u32>, u32, FxBuildHasher>,
    /// Rule id → the leaf whose only candidate it is (`NO_RULE`: none yet).
    single_rule_leaf: Vec<u32>,
    /// Scratch for [`paint_ports`](Self::paint_ports), kept to save allocations.
    scratch_ids: Vec<u32>,
    scratch_cuts: Vec<u32>,
}

/// A prefix's role in one rule: one of its `to` prefixes, or one of its `except` prefixes.
#[derive(Clone, Copy)]
enum PrefixUse {
    To(u32),
    Except(u32),
}

impl<'a> LeafCompiler<'a> {
    /// `rules` must only name groups below `group_count` (the builder checks).
    fn new(rules: &'a [RuleSpec], group_count: usize, dry_run: bool) -> Self {
        let mut rules_by_group: Vec<Vec<u32>> = vec![Vec::new(); group_count];
        for (i, r) in rules.iter().enumerate() {
            if let Some(list) = rules_by_group.get_mut(r.group.0 as usize) {
                list.push(i as u32);
            }
        }
        let mut this = LeafCompiler {
            rules,
            dry_run,
            rules_by_group,
            leaves: Vec::new(),
            runs: Vec::new(),
            interned: HashMap::default(),
            single_rule_leaf: vec![NO_RULE; rules.len()],
            scratch_ids: Vec::new(),
            scratch_cuts: Vec::new(),
        };
        // Leaf 0: nothing matches (default deny).
        let empty = this.compile_leaf(&[]);
        this.leaves.push(empty);
        this
    }

    fn group_table(&mut self, group: GroupId, ipv4: bool) -> LpmTable {
        let bits = if ipv4 { 32 } else { 128 };
        let Some(rule_ids) = self.rules_by_group.get(group.0 as usize) else {
            return LpmTable::build(bits, &[], 0);
        };
        // Every prefix use of the group, sorted by prefix (stable: rule order within one prefix).
        let mut uses: Vec<(u128, u8, PrefixUse)> = Vec::new();
        for &r in rule_ids {
            let rule = &self.rules[r as usize];
            for p in rule.to.iter().filter(|p| p.is_ipv4() == ipv4) {
                uses.push((p.key(), p.len, PrefixUse::To(r)));
            }
            for p in rule.except.iter().filter(|p| p.is_ipv4() == ipv4) {
                uses.push((p.key(), p.len, PrefixUse::Except(r)));
            }
        }
        uses.sort_by_key(|&(key, len, _)| (key, len));
        let max: u128 = if ipv4 { u32::MAX as u128 } else { u128::MAX };
        let last_of = |key: u128, len: u8| if u32::from(len) == bits { key } else { key | (max >> len) };
        let mut entries = Vec::new();
        // The chain of distinct prefixes containing the current one (each nested in the previous), as
        // (key, len, range of `uses`).
        let mut chain: Vec<(u128, u8, Range<usize>)> = Vec::new();
        let mut best: Vec<(u32, u8)> = Vec::new();
        let mut excluded: Vec<u32> = Vec::new();
        let mut candidates: Vec<u32> = Vec::new();
        let mut start = 0;
        while start < uses.len() {
            let (key, len, _) = uses[start];
            let end = start + uses[start..].iter().take_while(|u| (u.0, u.1) == (key, len)).count();
            while let Some((k, l, _)) = chain.last() {
                if last_of(*k, *l) >= key {
                    break;
                }
                chain.pop();
            }
            chain.push((key, len, start..end));
            start = end;
            best.clear();
            excluded.clear();
            for (_, link_len, range) in &chain {
                for &(_, _, u) in &uses[range.clone()] {
                    match u {
                        PrefixUse::To(r) => match best.iter_mut().find(|(rule, _)| *rule == r) {
                            Some(entry) => entry.1 = entry.1.max(*link_len),
                            None => best.push((r, *link_len)),
                        },
                        PrefixUse::Except(r) => excluded.push(r),
                    }
                }
            }
            best.retain(|(r, _)| !excluded.contains(r));
            best.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            candidates.clear();
            candidates.extend(best.iter().map(|&(r, _)| r));
            let leaf = match self.interned_leaf(&candidates) {
                Some(leaf) => leaf,
                None => {
                    let compiled = self.compile_leaf(&candidates);
                    let leaf = self.leaves.len() as u32;
                    self.leaves.push(compiled);
                    self.intern(&candidates, leaf);
                    leaf
                }
            };
            entries.push((key, len, leaf));
        }
        LpmTable::build(bits, &entries, 0)
    }

    /// The leaf already compiled for this candidate list. Lists of one rule (most leaves) are found by index,
    /// without hashing.
    fn interned_leaf(&self, candidates: &[u32]) -> Option<u32> {
        match candidates {
            [] => Some(0),
            [rule] => self.single_rule_leaf.get(*rule as usize).copied().filter(|&leaf| leaf != NO_RULE),
            _ => self.interned.get(candidates).copied(),
        }
    }

    fn intern(&mut self, candidates: &[u32], leaf: u32) {
        match candidates {
            [] => {}
            [rule] => {
                if let Some(slot) = self.single_rule_leaf.get_mut(*rule as usize) {
                    *slot = leaf;
                }
            }
            _ => {
                self.interned.insert(candidates.to_vec(), leaf);
            }
        }
    }

    /// Paints the candidates (precedence order) into per-protocol decisions.
    fn compile_leaf(&mut self, candidates: &[u32]) -> DestLeaf {
        let tcp = self.paint_ports(candidates, ip_proto::TCP);
        let udp = self.paint_ports(candidates, ip_proto::UDP);
        let first_portless = |proto: u8| {
            let rule = candidates
                .iter()
                .copied()
                .find(|&r| {
                    let rule = &self.rules[r as usize];
                    rule.proto.matches(proto) && rule.ports.is_empty()
                })
                .unwrap_or(NO_RULE);
            RunSlice { start: rule, extra: 0, outcome: self.outcome(rule) }
        };
        // 255 (reserved) stands for "any other protocol": only `any` matches it.
        DestLeaf { classes: [tcp, udp, first_portless(ip_proto::ICMP), first_portless(255)] }
    }

    /// `rule`'s outcome (the global dry-run switch folded in).
    fn outcome(&self, rule: u32) -> Outcome {
        self.rules
            .get(rule as usize)
            .map_or(NO_OUTCOME, |r| Outcome { action: r.action, dry_run: r.dry_run || self.dry_run })
    }

    /// A run starting at `first_port`, decided by `rule` (or by none), with the rule's outcome.
    fn port_run(&self, first_port: u16, rule: u32) -> PortRun {
        PortRun { first_port, outcome: self.outcome(rule), rule }
    }

    fn paint_ports(&mut self, candidates: &[u32], proto: u8) -> RunSlice {
        let rules = self.rules;
        let mut ids = std::mem::take(&mut self.scratch_ids);
        let mut cuts = std::mem::take(&mut self.scratch_cuts);
        ids.clear();
        ids.extend(candidates.iter().copied().filter(|&r| rules[r as usize].proto.matches(proto)));
        // Cut points: every place some candidate's port set starts or ends.
        cuts.clear();
        cuts.push(0);
        for &r in &ids {
            let rule = &rules[r as usize];
            if rule.ports.is_empty() {
                break; // nothing below a port-less candidate can win
            }
            for p in &rule.ports {
                cuts.push(u32::from(p.first));
                cuts.push(u32::from(p.last) + 1);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let start = self.runs.len() as u32;
        for &cut in cuts.iter().filter(|&&c| c <= u32::from(u16::MAX)) {
            let port = cut as u16;
            let rule = ids
                .iter()
                .copied()
                .find(|&r| {
                    let ports = &rules[r as usize].ports;
                    ports.is_empty() || ports.iter().any(|p| p.contains(port))
                })
                .unwrap_or(NO_RULE);
            if self.runs.len() as u32 > start && self.runs.last().is_some_and(|last| last.rule == rule) {
                continue;
            }
            let run = self.port_run(port, rule);
            self.runs.push(run);
        }
        self.scratch_ids = ids;
        self.scratch_cuts = cuts;
        // At least one run (port 0 is always a cut), at most 65 536.
        let extra = (self.runs.len() as u32 - start).saturating_sub(1);
        if extra == 0 {
            let run = self.runs.pop().unwrap_or(NO_RUN);
            return RunSlice { start: run.rule, extra: 0, outcome: run.outcome };
        }
        RunSlice { start, extra: extra.min(u32::from(u16::MAX)) as u16, outcome: NO_OUTCOME }
    }
}

/// FxHash (rustc's): a fast, non-keyed hash for the compiler's interning table. The input is the operator's own
/// policy, not attacker-controlled, so flooding resistance buys nothing there and SipHash showed in profiles.
#[derive(Clone, Copy, Default)]
struct FxHasher(u64);

type FxBuildHasher = std::hash::BuildHasherDefault<FxHasher>;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct CompiledGroup {
    name: String,
    /// A hash of the name: names the group across reloads (ids are positions and may change).
    key: u32,
    port_limit: Option<u32>,
    egress_ips: Vec<Ipv4Addr>,
    /// `egress_ips`, each with its half of the rendezvous hash input precomputed (for
    /// [`PolicySnapshot::egress_ip_for`]).
    pool: Box<[PoolEntry]>,
    dest_v4: LpmTable,
    dest_v6: LpmTable,
}

/// One egress IP of a group and its [`pool_key`].
#[derive(Clone, Copy)]
struct PoolEntry {
    key: u64,
    ip: u32,
}

/// Sizes of a compiled snapshot, for `egressd check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyStats {
    pub groups: usize,
    pub rules: usize,
    pub source_prefixes: usize,
    /// Distinct candidate lists (destination regions with different outcomes).
    pub destination_leaves: usize,
    pub port_runs: usize,
    pub trie_nodes: usize,
    /// Heap bytes of all lookup tables (tries, leaves, port runs).
    pub table_bytes: usize,
}

/// An immutable, compiled policy. `Send + Sync`; share it through a [`SharedPolicy`].
pub struct PolicySnapshot {
    generation: u64,
    dry_run: bool,
    sources_v4: LpmTable,
    sources_v6: LpmTable,
    source_prefixes: usize,
    groups: Vec<CompiledGroup>,
    /// The rules as given to the builder, for `explain`, the L7 path's host check and audit lines.
    specs: Vec<RuleSpec>,
    /// Per rule: its compiled L7 conditions, if it has any.
    l7: Vec<Option<l7::CompiledL7>>,
    services: service::ServiceTable,
    leaves: Vec<DestLeaf>,
    runs: Vec<PortRun>,
}

impl fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("generation", &self.generation)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PolicySnapshot {
    /// A policy with no groups: everything is `Deny(NoGroup)`. What a gateway runs before its first load.
    pub fn empty(generation: u64) -> PolicySnapshot {
        match PolicyBuilder::new().build(generation) {
            Ok(s) => s,
            Err(_) => unreachable!("an empty policy always builds"),
        }
    }

    /// Identifies this snapshot; the reloader bumps it on every successful reload. A flow records the generation
    /// it was judged under and is judged again when it changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the global dry-run switch is on.
    pub fn global_dry_run(&self) -> bool {
        self.dry_run
    }

    /// Judges a new flow. IPv4-mapped IPv6 addresses are IPv6 here. `dst_port` is 0 for ICMP.
    #[inline]
    pub fn evaluate(&self, src: IpAddr, dst: IpAddr, proto: u8, dst_port: u16) -> Decision {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.evaluate_v4(s, d, proto, dst_port),
            _ => {
                let group = self.lookup_group(src);
                self.decide(group, |g| g.dest_lookup(dst), proto, dst_port)
            }
        }
    }

    /// The IPv4 fast path. Never allocates or panics.
    #[inline]
    pub fn evaluate_v4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dst_port: u16) -> Decision {
        let group = self.sources_v4.lookup_u32(u32::from(src));
        self.decide(group, |g| g.dest_v4.lookup_u32(u32::from(dst)), proto, dst_port)
    }

    /// The group a source belongs to.
    pub fn group_of(&self, src: IpAddr) -> Option<GroupId> {
        self.lookup_group(src).checked_sub(1).map(GroupId)
    }

    fn lookup_group(&self, src: IpAddr) -> u32 {
        match src {
            IpAddr::V4(a) => self.sources_v4.lookup_u32(u32::from(a)),
            IpAddr::V6(a) => self.sources_v6.lookup_u128(u128::from(a)),
        }
    }

    #[inline(always)]
    fn decide(
        &self,
        group_value: u32,
        dest_leaf: impl FnOnce(&CompiledGroup) -> u32,
        proto: u8,
        dst_port: u16,
    ) -> Decision {
        let Some(index) = group_value.checked_sub(1) else { return self.no_group() };
        let run = self
            .groups
            .get(index as usize)
            .and_then(|g| self.leaves.get(dest_leaf(g) as usize))
            .map_or(NO_RUN, |leaf| self.leaf_run(leaf, proto, dst_port));
        self.decision(GroupId(index), run)
    }

    /// The decision for a source in no group.
    #[inline(always)]
    fn no_group(&self) -> Decision {
        Decision {
            verdict: Verdict::Deny(DenyReason::NoGroup),
            group: None,
            rule: None,
            dry_run: self.dry_run,
        }
    }

    /// The decision of a packet of `group` whose port run is `run` ([`NO_RUN`]: no rule matched).
    #[inline(always)]
    fn decision(&self, group: GroupId, run: PortRun) -> Decision {
        let group = Some(group);
        if run.rule == NO_RULE {
            return Decision {
                verdict: Verdict::Deny(DenyReason::DefaultDeny),
                group,
                rule: None,
                dry_run: self.dry_run,
            };
        }
        let Outcome { action, dry_run } = run.outcome;
        let (verdict, dry_run) = match action {
            Action::Allow => (Verdict::Allow, false),
            Action::Deny => (Verdict::Deny(DenyReason::Rule), dry_run),
            Action::L7 => (Verdict::L7, dry_run),
        };
        Decision { verdict, group, rule: Some(RuleId(run.rule)), dry_run }
    }

    #[inline(always)]
    fn leaf_run(&self, leaf: &DestLeaf, proto: u8, dst_port: u16) -> PortRun {
        self.slice_run(leaf.classes[proto_class(proto)], dst_port)
    }

    /// The run of `slice` (one protocol class of a leaf) that holds `dst_port`.
    #[inline(always)]
    fn slice_run(&self, slice: RunSlice, dst_port: u16) -> PortRun {
        if slice.extra == 0 {
            return PortRun { first_port: 0, outcome: slice.outcome, rule: slice.start };
        }
        let start = slice.start as usize;
        let Some(runs) = self.runs.get(start..=start + usize::from(slice.extra)) else {
            return NO_RUN;
        };
        // Last run starting at or below the port (the first run starts at port 0).
        let after = runs.partition_point(|run| run.first_port <= dst_port);
        runs.get(after.wrapping_sub(1)).copied().unwrap_or(NO_RUN)
    }

    /// The egress IPs of a group (empty for an unknown group).
    pub fn egress_ips(&self, group: GroupId) -> &[Ipv4Addr] {
        self.groups.get(group.0 as usize).map_or(&[], |g| &g.egress_ips)
    }

    /// Paired pooling (RFC 4787 REQ-2): the egress IP an inside host always leaves from. Rendezvous hashing of
    /// (source, egress IP): stable across restarts and reloads, and adding or removing one egress IP of a group
    /// moves only the hosts that had (or now get) that IP. `None` when the group has no egress IP.
    ///
    /// Every new flow asks, so the work is trimmed without changing the answer: a one-IP group answers at once;
    /// otherwise each IP costs one hash, of the source's precomputed half xor the IP's (see [`pool_key`]), and one
    /// branch-free compare.
    #[inline]
    pub fn egress_ip_for(&self, group: GroupId, src: Ipv4Addr) -> Option<Ipv4Addr> {
        let g = self.groups.get(group.0 as usize)?;
        match *g.pool {
            [] => None,
            [only] => Some(Ipv4Addr::from(only.ip)),
            ref pool => {
                let s = u64::from(u32::from(src));
                // The source's half of mix64's first step (see `pool_key`).
                let a = (s << 32) ^ (s << 2);
                // The highest (hash, IP): the IP with the highest hash. Two IPs tie only if they are equal (the hash
                // is a bijection of the IP for a given source), so this is exactly `max_by_key` over the hashes.
                let mut best = 0u128;
                for e in pool {
                    best = best.max((u128::from(mix64_after_first_step(a ^ e.key)) << 64) | u128::from(e.ip));
                }
                Some(Ipv4Addr::from(best as u32))
            }
        }
    }

    /// The group's name (empty for an unknown group).
    /// The cap on NAT ports `group` may hold per egress IP (all workers together), if it has one, and the
    /// group's key: nonzero, the same for the same group name in every policy generation.
    pub fn group_port_limit(&self, group: GroupId) -> Option<(u32, u32)> {
        let g = self.groups.get(group.0 as usize)?;
        g.port_limit.map(|limit| (g.key, limit))
    }

    pub fn group_name(&self, group: GroupId) -> &str {
        self.groups.get(group.0 as usize).map_or("", |g| &g.name)
    }

    /// The group called `name`.
    pub fn group_by_name(&self, name: &str) -> Option<GroupId> {
        self.groups.iter().position(|g| g.name == name).map(|i| GroupId(i as u32))
    }

    /// The rule as it was given to the builder.
    pub fn rule(&self, rule: RuleId) -> Option<&RuleSpec> {
        self.specs.get(rule.0 as usize)
    }

    /// For the L7 path: whether `host` (SNI or Host, any case, optional trailing dot) is allowed by `rule`'s host
    /// patterns. False for an unknown rule or one with no hosts.
    pub fn l7_conditions(&self, rule: RuleId) -> Option<&l7::CompiledL7> {
        self.l7.get(rule.0 as usize)?.as_ref()
    }

    /// The services, found by the Host of a request and the port its client dialled.
    pub fn services(&self) -> &service::ServiceTable {
        &self.services
    }

    /// Whether refusals of `rule` are only reported (the rule's or the policy's dry run): the L7 path then lets
    /// them through and counts them.
    pub fn l7_dry_run(&self, rule: RuleId) -> bool {
        self.dry_run || self.rule(rule).is_some_and(|r| r.dry_run)
    }

    pub fn host_allowed(&self, rule: RuleId, host: &str) -> bool {
        self.rule(rule).is_some_and(|r| r.hosts.iter().any(|p| p.matches(host)))
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn rule_count(&self) -> usize {
        self.specs.len()
    }

    pub fn stats(&self) -> PolicyStats {
        let tables = || {
            [&self.sources_v4, &self.sources_v6]
                .into_iter()
                .chain(self.groups.iter().flat_map(|g| [&g.dest_v4, &g.dest_v6]))
        };
        PolicyStats {
            groups: self.groups.len(),
            rules: self.specs.len(),
            source_prefixes: self.source_prefixes,
            destination_leaves: self.leaves.len(),
            port_runs: self.runs.len(),
            trie_nodes: tables().map(LpmTable::node_count).sum(),
            table_bytes: tables().map(LpmTable::memory_bytes).sum::<usize>()
                + self.leaves.len() * std::mem::size_of::<DestLeaf>()
                + self.runs.len() * std::mem::size_of::<PortRun>(),
        }
    }
}

impl CompiledGroup {
    fn new(name: String, egress_ips: Vec<Ipv4Addr>, dest_v4: LpmTable, dest_v6: LpmTable) -> CompiledGroup {
        let pool = egress_ips.iter().map(|&ip| PoolEntry { key: pool_key(ip), ip: u32::from(ip) }).collect();
        // FNV-1a: stable across processes and releases (the key lives only as long as the NAT's mappings).
        let key = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193)) | 1;
        CompiledGroup { name, key, port_limit: None, egress_ips, pool, dest_v4, dest_v6 }
    }

    fn dest_lookup(&self, dst: IpAddr) -> u32 {
        match dst {
            IpAddr::V4(a) => self.dest_v4.lookup_u32(u32::from(a)),
            IpAddr::V6(a) => self.dest_v6.lookup_u128(u128::from(a)),
        }
    }
}

/// SplitMix64's finaliser: a fixed, well-mixed 64-bit hash (stable across builds and platforms). Paired pooling
/// ranks egress IP `ip` for source `src` by `mix64((src << 32) | ip)`.
#[cfg(test)]
fn mix64(x: u64) -> u64 {
    mix64_after_first_step(x ^ (x >> 30))
}

/// [`mix64`] of `x`, given `x ^ (x >> 30)`.
#[inline(always)]
fn mix64_after_first_step(y: u64) -> u64 {
    let x = y.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The egress IP's half of mix64's first step. For `x = (src << 32) | ip` the two halves do not overlap, so
/// `x ^ (x >> 30) = ((src << 32) ^ (src << 2)) ^ (ip ^ (ip >> 30))`: a source-only part computed once per lookup
/// and this IP-only part computed once per snapshot.
fn pool_key(ip: Ipv4Addr) -> u64 {
    let i = u64::from(u32::from(ip));
    i ^ (i >> 30)
}

#[cfg(test)]
mod tests;
