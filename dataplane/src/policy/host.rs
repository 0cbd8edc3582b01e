//! Host-name patterns of `l7` rules: parsing with normalisation, and matching a presented SNI / Host name.
//!
//! A pattern is an exact name (`api.stripe.com`) or a wildcard whose leftmost label is exactly `*`
//! (`*.paypal.com`). A wildcard matches one or more labels in front of its suffix (`www.paypal.com`,
//! `a.b.paypal.com`), never the bare suffix (`paypal.com`) — the Envoy/Istio reading, not the one-label TLS
//! certificate reading. Names are ASCII (IDNs in their `xn--` form), compared case-insensitively, and a single
//! trailing dot is ignored. Limits: labels of 1–63 octets of letters, digits and `-` (not at either end), whole
//! name ≤ 253 octets.

use std::fmt;

/// A validated, normalised (lowercase, no trailing dot) host pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    /// For a wildcard, the suffix after `*.`; otherwise the whole name.
    name: String,
    wildcard: bool,
}

/// Why a host pattern is malformed; `Display` is a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPatternError {
    Empty,
    NotAscii,
    TooLong(usize),
    EmptyLabel,
    LabelTooLong(String),
    BadCharacter(char),
    HyphenAtLabelEdge(String),
    MisplacedWildcard,
    BareWildcard,
    IpLiteral,
}

impl fmt::Display for HostPatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPatternError::Empty => write!(f, "empty host name"),
            HostPatternError::NotAscii => {
                write!(f, "host names must be ASCII (write IDNs in their xn-- form)")
            }
            HostPatternError::TooLong(n) => write!(f, "host name is {n} octets long (at most 253)"),
            HostPatternError::EmptyLabel => {
                write!(f, "host name has an empty label (\"..\" or a leading dot)")
            }
            HostPatternError::LabelTooLong(l) => {
                write!(f, "label \"{l}\" is {} octets long (at most 63)", l.len())
            }
            HostPatternError::BadCharacter(c) => {
                write!(f, "character {c:?} is not allowed in a host name (letters, digits, '-' and '.')")
            }
            HostPatternError::HyphenAtLabelEdge(l) => write!(f, "label \"{l}\" starts or ends with '-'"),
            HostPatternError::MisplacedWildcard => {
                write!(f, "a wildcard must be the whole leftmost label, as in \"*.example.com\"")
            }
            HostPatternError::BareWildcard => {
                write!(f, "\"*\" alone matches every name; name a domain, as in \"*.example.com\"")
            }
            HostPatternError::IpLiteral => write!(f, "an IP address is not a host name; put it in `to`"),
        }
    }
}

impl std::error::Error for HostPatternError {}

impl HostPattern {
    /// Parses and normalises a pattern (lowercase, one trailing dot removed).
    pub fn parse(text: &str) -> Result<HostPattern, HostPatternError> {
        if !text.is_ascii() {
            return Err(HostPatternError::NotAscii);
        }
        let text = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        if text.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if text == "*" {
            return Err(HostPatternError::BareWildcard);
        }
        if text.parse::<std::net::IpAddr>().is_ok() {
            return Err(HostPatternError::IpLiteral);
        }
        if text.len() > 253 {
            return Err(HostPatternError::TooLong(text.len()));
        }
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, text),
        };
        for label in name.split('.') {
            if label.is_empty() {
                return Err(HostPatternError::EmptyLabel);
            }
            if label.contains('*') {
                return Err(HostPatternError::MisplacedWildcard);
            }
            if label.len() > 63 {
                return Err(HostPatternError::LabelTooLong(label.to_string()));
            }
            if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
                return Err(HostPatternError::BadCharacter(c));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(HostPatternError::HyphenAtLabelEdge(label.to_string()));
            }
        }
        Ok(HostPattern { name, wildcard })
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether `host` (an SNI or Host value; any case, optional trailing dot) is matched. Never allocates.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if !self.wildcard {
            return host.eq_ignore_ascii_case(&self.name);
        }
        // One or more labels, then ".", then the suffix.
        let Some(prefix_len) = host.len().checked_sub(self.name.len() + 1) else { return false };
        prefix_len > 0
            && host.is_char_boundary(prefix_len)
            && host.as_bytes()[prefix_len] == b'.'
            && host[prefix_len + 1..].eq_ignore_ascii_case(&self.name)
            && !host[..prefix_len].split('.').any(str::is_empty)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        let p = HostPattern::parse("API.Stripe.COM.").unwrap();
        assert_eq!(p.to_string(), "api.stripe.com");
        assert!(p.matches("api.stripe.com"));
        assert!(p.matches("Api.Stripe.Com."));
        assert!(!p.matches("api.stripe.com.evil.net"));
        assert!(!p.matches("xapi.stripe.com"));
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_suffix_itself() {
        let p = HostPattern::parse("*.paypal.com").unwrap();
        assert!(p.is_wildcard());
        assert!(p.matches("www.paypal.com"));
        assert!(p.matches("a.b.PAYPAL.com."));
        assert!(!p.matches("paypal.com"));
        assert!(!p.matches(".paypal.com"));
        assert!(!p.matches("a..paypal.com"));
        assert!(!p.matches("evilpaypal.com"));
        assert!(!p.matches("www.paypal.com.evil"));
    }

    #[test]
    fn rejects_malformed_patterns() {
        use HostPatternError as E;
        assert_eq!(HostPattern::parse(""), Err(E::Empty));
        assert_eq!(HostPattern::parse("."), Err(E::Empty));
        assert_eq!(HostPattern::parse("*"), Err(E::BareWildcard));
        assert_eq!(HostPattern::parse("a.*.com"), Err(E::MisplacedWildcard));
        assert_eq!(HostPattern::parse("*a.com"), Err(E::MisplacedWildcard));
        assert_eq!(HostPattern::parse("**.com"), Err(E::MisplacedWildcard));
        assert_eq!(HostPattern::parse("a..com"), Err(E::EmptyLabel));
        assert_eq!(HostPattern::parse("bücher.de"), Err(E::NotAscii));
        assert_eq!(HostPattern::parse("a_b.com"), Err(E::BadCharacter('_')));
        assert_eq!(HostPattern::parse("-a.com"), Err(E::HyphenAtLabelEdge("-a".into())));
        assert_eq!(HostPattern::parse("10.0.0.1"), Err(E::IpLiteral));
        let long_label = "a".repeat(64);
        assert_eq!(HostPattern::parse(&format!("{long_label}.com")), Err(E::LabelTooLong(long_label)));
        let long_name = vec!["abcdefghi"; 26].join(".");
        assert_eq!(HostPattern::parse(&long_name), Err(E::TooLong(259)));
        assert!(HostPattern::parse(&"a".repeat(63)).is_ok());
    }
}
