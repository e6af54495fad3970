//! The reference matcher: the matching semantics written as plainly as possible, one rule at a time.
//!
//! It exists to check the compiled matcher (the property tests compare the two on generated policies and paths)
//! and to measure it (the benchmark's naive linear scan). Its cost is `O(rules × path)`: never use it on the hot
//! path.

use crate::{
    Match, NameError, PatternClass,
    compiled::CompiledPolicy,
    name::{COLON, Components, SEPARATOR, Volume, is_dot_component, split_volume},
    pattern::{GLOBSTAR, components_match, is_wild},
    upcase::eq_ignore_case,
};

/// What the reference matcher found: the winning rule's index and the remainder's start in the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The index of the rule in file order.
    pub rule: usize,
    /// The start of the remainder (the part below the literal prefix) in the path.
    pub remainder_start: usize,
}

/// The specificity key: smaller wins. Exact sources, then longer literal prefixes, then fewer wildcards, then
/// file order.
type Key = (bool, core::cmp::Reverse<usize>, usize, usize);

fn key(pattern: &[u16], index: usize) -> Key {
    let mut literal = 0usize;
    let mut wildcards = 0usize;
    let mut in_prefix = true;
    for (_, component) in Components::new(pattern) {
        let wild = component == GLOBSTAR || is_wild(component);
        if component == GLOBSTAR {
            wildcards = wildcards.saturating_add(1);
        } else {
            wildcards = wildcards.saturating_add(component.iter().filter(|&&u| u == 0x2A || u == 0x3F).count());
        }
        in_prefix &= !wild;
        if in_prefix {
            literal = literal.saturating_add(1);
        }
    }
    (wildcards > 0, core::cmp::Reverse(literal), wildcards, index)
}

fn process_matches(rule_process: Option<&[u16]>, image: Option<&[u16]>) -> bool {
    let Some(wanted) = rule_process else { return true };
    let Some(image) = image else { return false };
    if wanted.contains(&SEPARATOR) {
        match (split_volume(wanted), split_volume(image)) {
            (Some((v1, p1)), Some((v2, p2))) => v1 == v2 && eq_ignore_case(p1, p2),
            _ => false,
        }
    } else {
        let file_name = image.rsplit(|&u| u == SEPARATOR).next().unwrap_or(image);
        eq_ignore_case(file_name, wanted)
    }
}

/// Reports a `.`/`..` component or a directory stream among the components some rule's literal prefix reaches:
/// the longest run of leading components equal to a rule's literal prefix, plus the next one.
fn check_reached_components(policy: &CompiledPolicy, volume: &Volume, name: &[u16]) -> Result<(), NameError> {
    let mut reached = 0usize;
    for rule in policy.rules().filter(|rule| rule.source_volume() == *volume) {
        let common = Components::new(rule.literal_prefix())
            .zip(Components::new(name))
            .take_while(|((_, a), (_, b))| eq_ignore_case(a, b))
            .count();
        reached = reached.max(common);
    }
    for (_, component) in Components::new(name).take(reached.saturating_add(1)) {
        if component.contains(&COLON) {
            return Err(NameError::StreamOnDirectory);
        }
        if is_dot_component(component) {
            return Err(NameError::DotComponent);
        }
    }
    Ok(())
}

/// Matches `path` against every rule in turn and keeps the most specific match.
///
/// # Errors
/// The same [`NameError`]s as [`CompiledPolicy::match_path`].
pub fn match_linear(
    policy: &CompiledPolicy,
    volume: &Volume,
    path: &[u16],
    process_image: Option<&[u16]>,
    case_sensitive: bool,
) -> Result<Option<Found>, NameError> {
    if !policy.has_volume(volume) {
        return Ok(None);
    }
    let parsed = CompiledPolicy::parse(path)?;
    check_reached_components(policy, volume, parsed.name)?;
    let mut best: Option<(Key, Found)> = None;
    for rule in policy.rules() {
        if rule.source_volume() != *volume || !process_matches(rule.process(), process_image) {
            continue;
        }
        let source = rule.source();
        let pattern = split_volume(source).map_or(source, |(_, p)| p);
        if !components_match(pattern, parsed.name, case_sensitive) {
            continue;
        }
        let rule_key = key(pattern, rule.index());
        if best.as_ref().is_some_and(|(k, _)| *k <= rule_key) {
            continue;
        }
        let core::cmp::Reverse(literal) = rule_key.1;
        let remainder_start = if rule.class() == PatternClass::Exact {
            parsed.name.len()
        } else {
            Components::new(parsed.name).nth(literal).map_or(parsed.name.len(), |(start, _)| start)
        };
        best = Some((rule_key, Found { rule: rule.index(), remainder_start }));
    }
    Ok(best.map(|(_, found)| found))
}

/// Converts a compiled match into the reference's terms, to compare the two.
#[must_use]
pub fn found_of(found: &Match<'_, '_>) -> Found {
    Found { rule: found.rule().index(), remainder_start: found.remainder_start() }
}
