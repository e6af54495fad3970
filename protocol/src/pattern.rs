//! Source patterns: how a rule's source is split into a literal prefix and a wildcard part, and the glob matching
//! used for the wildcard part.
//!
//! Every function here works on `\`-separated UTF-16 without allocating, so the matcher can use it on the hot path.

use crate::{
    name::{Components, QUESTION, SEPARATOR, STAR},
    upcase::unit_eq,
};

/// The component `**`.
pub(crate) const GLOBSTAR: [u16; 2] = [STAR, STAR];

/// How a pattern is matched, from cheapest to costliest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PatternClass {
    /// No wildcard: one file. A hash lookup per path component.
    Exact = 0,
    /// `prefix\**`: everything below a directory. Found while walking the path's prefixes.
    Subtree = 1,
    /// `prefix\**\*SUFFIX` where the suffix contains a `.` (`*.log`, `*.tar.gz`): found by a hash lookup of the
    /// path's last extension at each prefix.
    SubtreeSuffix = 2,
    /// Anything else (`*` or `?` inside a component, `**` in the middle). Tried one by one for each rule whose
    /// literal prefix is a prefix of the path: cost `O(rules sharing the prefix × path length × pattern length)`.
    Glob = 3,
}

/// The shape of a checked source pattern (its path within the volume, with a leading `\`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) class: PatternClass,
    /// How many leading components are literal.
    pub(crate) prefix_components: usize,
    /// The offset in the path where the first non-literal component starts (the path's length if none).
    pub(crate) rest: usize,
    /// For [`PatternClass::SubtreeSuffix`], the offset of the literal suffix (after the `*`).
    pub(crate) suffix: usize,
    /// `*` and `?` count one each, `**` counts one.
    pub(crate) wildcards: usize,
}

pub(crate) fn is_wild(component: &[u16]) -> bool {
    component.iter().any(|&u| u == STAR || u == QUESTION)
}

/// Classifies a source path whose components were already checked (non-empty, valid characters).
pub(crate) fn shape(path: &[u16]) -> Shape {
    let mut prefix_components = 0usize;
    let mut rest = path.len();
    let mut wildcards = 0usize;
    let mut literal_prefix_done = false;
    for (start, component) in Components::new(path) {
        let wild = component.iter().filter(|&&u| u == STAR || u == QUESTION).count();
        wildcards = wildcards.saturating_add(if component == GLOBSTAR { 1 } else { wild });
        // `**` counts as one wildcard but holds two.
        if !literal_prefix_done && wild > 0 {
            literal_prefix_done = true;
            rest = start;
        }
        if !literal_prefix_done {
            prefix_components = prefix_components.saturating_add(1);
        }
    }
    let tail = path.get(rest..).unwrap_or_default();
    let mut parts = Components::new(tail).map(|(_, c)| c);
    let class = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => PatternClass::Exact,
        (Some(GLOBSTAR_REF), None, _) => PatternClass::Subtree,
        (Some(GLOBSTAR_REF), Some([STAR, suffix @ ..]), None)
            if !is_wild(suffix) && suffix.contains(&u16::from(b'.')) =>
        {
            PatternClass::SubtreeSuffix
        }
        _ => PatternClass::Glob,
    };
    let suffix = if class == PatternClass::SubtreeSuffix {
        // The suffix starts one unit after the last component's `*`.
        path.iter().rposition(|&u| u == SEPARATOR).map_or(path.len(), |p| p.saturating_add(2))
    } else {
        path.len()
    };
    Shape { class, prefix_components, rest, suffix, wildcards }
}

const GLOBSTAR_REF: &[u16] = &GLOBSTAR;

/// Matches one component pattern (`*` any run of units, `?` one unit, anything else itself) against a name.
///
/// The classic greedy algorithm with one backtrack point: `O(pattern × name)` in the worst case, no allocation.
pub(crate) fn component_matches(pattern: &[u16], name: &[u16], case_sensitive: bool) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    loop {
        match (pattern.get(p), name.get(n)) {
            (Some(&STAR), _) => {
                p = p.saturating_add(1);
                star = Some((p, n));
            }
            (Some(&unit), Some(&actual)) if unit == QUESTION || unit_eq(unit, actual, case_sensitive) => {
                p = p.saturating_add(1);
                n = n.saturating_add(1);
            }
            (None, None) => return true,
            _ => match star {
                Some((star_p, star_n)) if star_n < name.len() => {
                    let next = star_n.saturating_add(1);
                    star = Some((star_p, next));
                    p = star_p;
                    n = next;
                }
                _ => return false,
            },
        }
    }
}

/// Matches pattern components against path components (both `\`-separated; empty path components are skipped).
///
/// `**` matches any number of components, except that a trailing `**` matches at least one: `dir\**` is what lies
/// below `dir`, not `dir` itself. Greedy with one backtrack point at the last `**`, so no allocation and
/// `O(pattern × path)` component comparisons in the worst case.
pub(crate) fn components_match(pattern: &[u16], path: &[u16], case_sensitive: bool) -> bool {
    let mut p = Components::new(pattern);
    let mut s = Components::new(path);
    let mut backtrack: Option<(Components<'_>, Components<'_>)> = None;
    loop {
        let token = p.next().map(|(_, t)| t);
        match token {
            Some(GLOBSTAR_REF) => {
                if p.clone().next().is_none() {
                    return s.next().is_some();
                }
                backtrack = Some((p.clone(), s.clone()));
                continue;
            }
            Some(token) => {
                if let Some((_, name)) = s.next()
                    && component_matches(token, name, case_sensitive)
                {
                    continue;
                }
            }
            None => {
                if s.clone().next().is_none() {
                    return true;
                }
            }
        }
        match &mut backtrack {
            Some((after_star, retry_from)) => {
                if retry_from.next().is_none() {
                    return false;
                }
                p = after_star.clone();
                s = retry_from.clone();
            }
            None => return false,
        }
    }
}

/// Whether some path at or below `path` (`path` itself, or `path` followed by more components) could match the
/// pattern. Used to find targets that lie inside a source. Case-insensitive, since it looks for any conflict.
pub(crate) fn could_match_at_or_below(pattern: &[u16], path: &[u16]) -> bool {
    // Every remaining pattern component can be satisfied by a component we choose, so the question is whether the
    // pattern has a prefix (in the sense of components_match) that matches `path`, or `path` is consumed while the
    // pattern is not. Try each cut of the pattern after a component.
    if components_match(pattern, path, false) {
        return true;
    }
    for (start, component) in Components::new(pattern) {
        let end = start.saturating_add(component.len());
        let head = pattern.get(..end).unwrap_or_default();
        // A head ending in `**` matches `path` itself when `**` may be empty, which components_match forbids for a
        // trailing `**`: a continuation below `path` then satisfies it.
        if components_match(head, path, false) || (component == GLOBSTAR && head_matches_with_empty_tail(head, path)) {
            return true;
        }
    }
    false
}

fn head_matches_with_empty_tail(head: &[u16], path: &[u16]) -> bool {
    let without = head.get(..head.len().saturating_sub(GLOBSTAR.len())).unwrap_or_default();
    components_match(without, path, false)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "a panic in a test is a failed test"
)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn w(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    #[test]
    fn component_wildcards() {
        assert!(component_matches(&w("*.LOG"), &w("app.log"), false));
        assert!(!component_matches(&w("*.LOG"), &w("app.log"), true));
        assert!(component_matches(&w("a?c"), &w("abc"), true));
        assert!(!component_matches(&w("a?c"), &w("ac"), true));
        assert!(component_matches(&w("*"), &w(""), true));
        assert!(component_matches(&w("*a*b*"), &w("xxaYYbzz"), true));
        assert!(!component_matches(&w("*a*b"), &w("xxaYYbzz"), true));
        assert!(component_matches(&w("ä*"), &w("Äpfel"), false));
    }

    #[test]
    fn component_level_globstar() {
        assert!(components_match(&w(r"\a\**"), &w(r"\a\b"), false));
        assert!(components_match(&w(r"\a\**"), &w(r"\a\b\c"), false));
        assert!(!components_match(&w(r"\a\**"), &w(r"\a"), false));
        assert!(components_match(&w(r"\a\**\*.log"), &w(r"\a\x.log"), false));
        assert!(components_match(&w(r"\a\**\*.log"), &w(r"\a\b\c\x.log"), false));
        assert!(!components_match(&w(r"\a\**\*.log"), &w(r"\a\b\c\x.txt"), false));
        assert!(components_match(&w(r"\a\**\b\**\c"), &w(r"\a\x\b\y\b\c"), false));
        assert!(!components_match(&w(r"\a\*\c"), &w(r"\a\b\d\c"), false));
        assert!(components_match(&w(r"\a\\b"), &w(r"\a\b"), true));
    }

    #[test]
    fn shapes() {
        let s = shape(&w(r"\Apps\Legacy\config\**"));
        assert_eq!((s.class, s.prefix_components, s.wildcards), (PatternClass::Subtree, 3, 1));
        let path = w(r"\Logs\**\*.log");
        let s = shape(&path);
        assert_eq!(s.class, PatternClass::SubtreeSuffix);
        assert_eq!(&path[s.suffix..], &w(".log")[..]);
        assert_eq!(&path[s.rest..], &w(r"**\*.log")[..]);
        assert_eq!(shape(&w(r"\Logs\**\*x")).class, PatternClass::Glob);
        assert_eq!(shape(&w(r"\Logs\*.log")).class, PatternClass::Glob);
        assert_eq!(shape(&w(r"\a\b")).class, PatternClass::Exact);
    }

    #[test]
    fn targets_below_patterns() {
        assert!(could_match_at_or_below(&w(r"\a\**"), &w(r"\a\b")));
        assert!(could_match_at_or_below(&w(r"\a\**"), &w(r"\a")));
        assert!(could_match_at_or_below(&w(r"\a\*\c"), &w(r"\a\x")));
        assert!(!could_match_at_or_below(&w(r"\a\*\c"), &w(r"\b")));
        assert!(could_match_at_or_below(&w(r"\a\b"), &w(r"\a")));
        assert!(!could_match_at_or_below(&w(r"\a\b"), &w(r"\a\c")));
    }
}
