//! The compiled policy: validation, the per-volume trie of literal path components, and the matcher that every
//! file open goes through.
//!
//! # Structure
//!
//! All strings of all rules live in one UTF-16 arena. The literal prefixes of the sources form a trie, one root per
//! volume, whose edges are kept in a single open-addressing hash table keyed by (parent node, upcased component).
//! Each node (16 bytes) heads one list of the rules whose literal prefix ends at the node, sorted best first: the
//! rules whose source is exactly the node's path come first (exact sources outrank every pattern), then the
//! `node\**` and glob rules in rank order; flags on the node say which kinds the list holds. `node\**\*.ext` rules
//! hang below a second kind of node keyed by (parent node, upcased last extension). The table is at most two-thirds
//! full. All but the smallest tries also have a small Bloom filter over the table's keys, so that the usual miss
//! is answered without touching the table.
//!
//! Matching walks the path once, component by component, following the trie, and leaves at the first component no rule
//! continues with (most names leave within a few components). Each component is read once, four units at a time: its
//! end, its upcased hash and any `:` or `~` come out of the same pass. A slot entry holds the high bits of the key's
//! hash (which covers the parent node, the key kind, the length and the upcased text) beside the node index, and an
//! entry a probe for another key could stop at is flagged when the table is built. The first walk trusts an unflagged
//! entry whose hash bits are the component's without reading the node or its text, so a step costs a hash and one slot
//! read; a name no key has can rarely be taken for one, which only ever adds candidates, so that walk's "no rule"
//! stands and the few names it finds a rule for (or rejects) are walked again comparing each component with the node's
//! text, four units at a time, read in place from the arena and the path. At each node with rules below it the walk
//! tries the subtree and glob rules of its list, and looks the suffix table up with the path's last extension; at the
//! end it checks the exact rules at the head of the last node's list. The stream suffix is split off only when a rule
//! matches or the path holds a `:` the walk did not reach. Each step is a hash of one component and a bounded
//! comparison, so the cost grows with the path's length and not with the number of rules — except for glob rules, which
//! are tried one by one.

use alloc::{collections::TryReserveError, vec::Vec};
use core::fmt;

use crate::{
    name::{self, COLON, Components, DOT, SEPARATOR, Volume, check_component, is_valid_utf16, split_volume},
    pattern::{self, GLOBSTAR, PatternClass, Shape},
    policy::{Access, Field, MAX_NAME_UNITS, MAX_PATH_UNITS, MAX_RULES, Method, PolicyError, Problem, RuleSpec},
    upcase::{eq_ignore_case, name_eq, upcase},
};

const NIL: u32 = u32::MAX;

/// How a compiled policy is allowed to name volumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VolumeNames {
    /// Only `\\?\Volume{GUID}\`: what the driver accepts.
    #[default]
    GuidsOnly,
    /// Drive letters too: for checking and testing a policy file on a host that cannot resolve them.
    AllowDriveLetters,
}

/// A location in the string arena.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    start: u32,
    len: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcessKind {
    Any,
    Name,
    Path,
}

/// One rule as the matcher keeps it. Offsets are relative to the start of the rule's own strings.
#[derive(Clone, Copy, Debug)]
struct CompiledRule {
    /// The rule's strings are consecutive in the arena: name, source, target, process.
    start: u32,
    name_len: u16,
    source_len: u16,
    target_len: u16,
    process_len: u16,
    /// Where the path within the volume starts in `source`, `target` and (for a path) `process`.
    source_path: u16,
    target_path: u16,
    process_path: u16,
    /// Where the first non-literal component starts in `source` (its length for an exact source).
    rest: u16,
    /// Where a suffix rule's literal suffix starts in `source`.
    suffix: u16,
    prefix_components: u16,
    source_volume: u16,
    target_volume: u16,
    process_volume: u16,
    class: PatternClass,
    method: Method,
    access: Access,
    process_kind: ProcessKind,
    /// 0 is the most specific rule of the policy.
    rank: u32,
    /// The next rule in the same trie list, in rank order.
    next: u32,
}

impl CompiledRule {
    fn name(&self) -> Span {
        Span { start: self.start, len: self.name_len }
    }

    fn source(&self) -> Span {
        Span { start: self.start.saturating_add(u32::from(self.name_len)), len: self.source_len }
    }

    fn target(&self) -> Span {
        let start = self.start.saturating_add(u32::from(self.name_len)).saturating_add(u32::from(self.source_len));
        Span { start, len: self.target_len }
    }

    fn process(&self) -> Span {
        let start = self
            .start
            .saturating_add(u32::from(self.name_len))
            .saturating_add(u32::from(self.source_len))
            .saturating_add(u32::from(self.target_len));
        Span { start, len: self.process_len }
    }
}

const NODE_SUFFIX_KEY: u8 = 1;
const NODE_HAS_SUFFIXES: u8 = 2;
const NODE_HAS_CHILDREN: u8 = 4;
/// The node's list holds a `node\**` rule.
const NODE_HAS_SUBTREE: u8 = 8;
/// The node's list holds a glob rule.
const NODE_HAS_GLOB: u8 = 16;
/// Rules that a path below the node may match: the walk tries them at the node.
const NODE_RULES_BELOW: u8 = NODE_HAS_SUFFIXES | NODE_HAS_SUBTREE | NODE_HAS_GLOB;

/// A trie node: a literal component below its parent, or (with `NODE_SUFFIX_KEY`) an extension.
///
/// One list holds every rule whose literal prefix ends at the node (for an extension node, its suffix rules),
/// best first. Exact sources outrank every pattern, so the exact rules come first and the `node\**` and glob
/// rules follow in rank order; the flags say which kinds are there, so the walk reads the list only when it
/// holds rules that can match.
#[derive(Clone, Copy, Debug)]
struct Node {
    parent: u32,
    text_start: u32,
    rules: u32,
    text_len: u16,
    flags: u8,
}

const _: () = assert!(size_of::<Node>() == 16, "four nodes to a cache line");

impl Node {
    fn new(parent: u32, text: Span, flags: u8) -> Self {
        Self { parent, text_start: text.start, rules: NIL, text_len: text.len, flags }
    }

    fn has_rules_below(&self) -> bool {
        self.flags & NODE_RULES_BELOW != 0
    }
}

/// Why a name cannot be matched as given. The driver fails such creates with `STATUS_OBJECT_NAME_INVALID`, which
/// is what NTFS answers for them too, so refusing them never changes a legitimate open and no spelling of this kind
/// can bypass a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// A `.` or `..` component: NT names are already resolved; NTFS rejects these.
    DotComponent,
    /// A `:` in a directory component (`dir:$I30:$INDEX_ALLOCATION\file`): only the last component may name a
    /// stream.
    StreamOnDirectory,
    /// A last component that is only a stream (`dir\:stream`).
    StreamWithoutName,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DotComponent => "a `.` or `..` path component",
            Self::StreamOnDirectory => "a stream name on a directory component",
            Self::StreamWithoutName => "a stream name without a file name",
        })
    }
}

/// Memory a compiled policy holds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// The rules' own strings (name, source, target, process).
    pub strings: usize,
    /// Everything else: rule records, trie nodes, the hash table, the volume table.
    pub structure: usize,
}

/// A validated, compiled policy: the only form of a policy the matcher accepts.
///
/// Matching ([`match_path`](Self::match_path), [`could_match`](Self::could_match)) takes `&self`, allocates
/// nothing, takes no lock and cannot panic; the driver shares one `CompiledPolicy` between all threads and replaces
/// it as a whole.
#[derive(Debug, Default)]
pub struct CompiledPolicy {
    arena: Vec<u16>,
    rules: Vec<CompiledRule>,
    volumes: Vec<Volume>,
    nodes: Vec<Node>,
    /// Open addressing over `nodes` ([`NIL`] for an empty slot); its length is a power of two. An entry holds the
    /// node's index in its low bits (`index_mask`), above them a flag set when a probe for another key could stop
    /// at this entry on its hash bits alone (`verify_bit`), and the high bits of the node's hash above that. The
    /// walk trusts an unflagged entry whose hash bits are the component's without reading the node (see
    /// [`CompiledPolicy::lookup`]).
    slots: Vec<u32>,
    /// The bits of a slot entry that hold the node index: all of them while the trie is built, the fewest that
    /// can hold every index once it is done (so that no entry equals `NIL`).
    index_mask: u32,
    /// The flag bit just above `index_mask` (0 while the trie is built, when every lookup compares texts).
    verify_bit: u32,
    /// A blocked Bloom filter over the keys of `slots` (two bits of one word per key), empty for the smallest
    /// policies. Most lookups are misses at the first component no rule continues with; the filter answers them from
    /// a table of a few bits per node that stays in cache, where the slot table of a large policy would not, and
    /// with one word test where a miss in a table two-thirds full probes several entries.
    filter: Vec<u64>,
    /// The number of hash bits that select a filter word (`filter.len()` is `1 << filter_bits`).
    filter_bits: u32,
}

/// Policies with at least this many trie nodes get a [`CompiledPolicy::filter`]. Measured: even for 10 rules (about
/// 40 nodes, a slot table in cache) the filter saves more on misses than it costs; below this a probe is as cheap.
const FILTER_MIN_NODES: usize = 16;

/// The filter word and the two bits of it that stand for a key hash.
#[inline]
fn filter_position(hash: u32, bits: u32) -> (usize, u64) {
    let mixed = u64::from(hash).wrapping_mul(HASH_K);
    let word = mixed.checked_shr(u64::BITS.saturating_sub(bits)).unwrap_or(0);
    let mask = 1u64.wrapping_shl(u32::try_from(mixed & 63).unwrap_or(0))
        | 1u64.wrapping_shl(u32::try_from(mixed.wrapping_shr(6) & 63).unwrap_or(0));
    (usize::try_from(word).unwrap_or(0), mask)
}

/// One rule of a compiled policy.
#[derive(Clone, Copy)]
pub struct Rule<'a> {
    policy: &'a CompiledPolicy,
    compiled: &'a CompiledRule,
    index: usize,
}

/// The result of a successful match: which rule, and what of the caller's path it did not consume.
#[derive(Clone, Copy)]
pub struct Match<'a, 'p> {
    rule: Rule<'a>,
    remainder_start: usize,
    remainder: &'p [u16],
    stream: &'p [u16],
}

/// Which process a walk matches for.
#[derive(Clone, Copy)]
enum ProcessFilter<'i> {
    /// Every rule, whatever its process condition (for `could_match`).
    Any,
    /// The given image, or an unknown one (`None`), which only matches rules without a condition.
    Image(Option<&'i [u16]>),
}

/// Which rules a walk may return.
#[derive(Clone, Copy)]
struct Filter<'i> {
    process: ProcessFilter<'i>,
    case_sensitive: bool,
}

/// What one walk found.
struct Walk {
    found: Option<Found>,
    /// Whether a component has a `~` (a possible 8.3 alias).
    tilde: bool,
}

struct Found {
    rule: u32,
    rank: u32,
    remainder_start: usize,
}

/// The name a walk matches: the path without its stream suffix, the stream, and the last extension.
pub(crate) struct Parsed<'p> {
    pub(crate) name: &'p [u16],
    pub(crate) stream: &'p [u16],
    extension: Option<&'p [u16]>,
    final_component: &'p [u16],
}

// Component hashing works on four UTF-16 units at a time packed into a `u64` (lane `i` is bits `16 i..16 i + 16`),
// so that finding the end of a component, upcasing it, hashing it and spotting `:` and `~` in it take one pass and
// one multiplication per four units. The lane tricks are the classic "has a zero byte" ones, on 16-bit lanes.
const LANES_ONE: u64 = 0x0001_0001_0001_0001;
const LANES_HIGH: u64 = 0x8000_8000_8000_8000;
const LANES_NON_ASCII: u64 = 0xFF80_FF80_FF80_FF80;
const LANES_SEPARATOR: u64 = 0x005C_005C_005C_005C;
const LANES_COLON: u64 = 0x003A_003A_003A_003A;
const LANES_TILDE: u64 = 0x007E_007E_007E_007E;
const HASH_K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Packs four units into lanes.
#[inline]
fn pack(units: [u16; 4]) -> u64 {
    let [a, b, c, d] = units;
    u64::from(a) | u64::from(b).wrapping_shl(16) | u64::from(c).wrapping_shl(32) | u64::from(d).wrapping_shl(48)
}

/// Packs up to four units into lanes, filling the lanes past them with `pad` (without a call to `memcpy`).
#[expect(clippy::inline_always, reason = "measured: left to the compiler, the scan and compare loops call it")]
#[inline(always)]
fn pack_padded(units: &[u16], pad: u16) -> u64 {
    let unit = |i: usize| units.get(i).copied().unwrap_or(pad);
    pack([unit(0), unit(1), unit(2), unit(3)])
}

/// Marks (with the lane's top bit) the lanes of `lanes` equal to `pattern`'s. The lowest mark is exact; marks above
/// a true one may be spurious (a borrow), so callers use only the lowest mark or whether there is any.
#[inline]
fn lanes_equal(lanes: u64, pattern: u64) -> u64 {
    let v = lanes ^ pattern;
    v.wrapping_sub(LANES_ONE) & !v & LANES_HIGH
}

/// Upcases four lanes: branch-free when all are ASCII, with the table otherwise.
#[expect(clippy::inline_always, reason = "measured: left to the compiler, the scan and compare loops call it")]
#[inline(always)]
fn upcase_lanes(lanes: u64) -> u64 {
    if lanes & LANES_NON_ASCII == 0 {
        // Every lane is below 0x80, so these additions carry into no other lane; bit 7 of a lane is then set in
        // `above_a` for lanes >= `a` and in `above_z` for lanes > `z`.
        let above_a = lanes.wrapping_add(0x001F_001F_001F_001F);
        let above_z = lanes.wrapping_add(0x0005_0005_0005_0005);
        let lower = above_a & !above_z & 0x0080_0080_0080_0080;
        return lanes.wrapping_sub(lower.wrapping_shr(2));
    }
    upcase_lanes_with_table(lanes)
}

/// [`upcase_lanes`] for lanes that are not all ASCII: kept out of line so that the ASCII path stays small.
#[cold]
#[inline(never)]
fn upcase_lanes_with_table(lanes: u64) -> u64 {
    let [b0, b1, b2, b3, b4, b5, b6, b7] = lanes.to_le_bytes();
    pack([
        upcase(u16::from_le_bytes([b0, b1])),
        upcase(u16::from_le_bytes([b2, b3])),
        upcase(u16::from_le_bytes([b4, b5])),
        upcase(u16::from_le_bytes([b6, b7])),
    ])
}

/// The hash state before a key's text: the parent node and the key kind.
#[inline]
fn hash_seed(parent: u32, kind: u8) -> u64 {
    (u64::from(parent).wrapping_shl(8) | u64::from(kind)) ^ 0xA076_1D64_78BD_642F
}

#[inline]
fn hash_mix(hash: u64, upcased: u64) -> u64 {
    (hash ^ upcased).wrapping_mul(HASH_K).rotate_left(29)
}

#[inline]
fn hash_finish(hash: u64, len: usize) -> u32 {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    u32::try_from((hash ^ len).wrapping_mul(HASH_K).wrapping_shr(32)).unwrap_or(0)
}

/// The hash state a component's text starts from. The text is hashed on its own and joined with its parent and
/// kind only at the end ([`key_hash`]), so that the walk can hash a component before it knows which node it is
/// looked up under.
const TEXT_SEED: u64 = 0x2D35_8DCC_AA6C_78A5;

/// A key's hash from its parent node, its kind, the hash state of its upcased text and its length.
#[inline]
fn key_hash(parent: u32, kind: u8, text: u64, len: usize) -> u32 {
    hash_finish(hash_mix(text, hash_seed(parent, kind)), len)
}

/// Hashes a key: the parent node, the key kind and the upcased text, four units per multiplication. The last,
/// partial (possibly empty) group is padded with zeros: exactly what [`scan_component`] computes on a path.
fn hash_key(parent: u32, kind: u8, text: &[u16]) -> u32 {
    let mut hash = TEXT_SEED;
    let mut chunks = text.chunks_exact(4);
    for chunk in &mut chunks {
        if let [a, b, c, d] = *chunk {
            hash = hash_mix(hash, upcase_lanes(pack([a, b, c, d])));
        }
    }
    hash = hash_mix(hash, upcase_lanes(pack_padded(chunks.remainder(), 0)));
    key_hash(parent, kind, hash, text.len())
}

/// The four units of `buffer` from `at` packed into lanes, the lanes past its end zero. Reading whole groups
/// from the buffer a text lies in (the arena, the caller's path) rather than from the text itself means that only
/// a text at the very end of its buffer takes the padded path.
#[expect(clippy::inline_always, reason = "measured: left to the compiler, the compare loop calls it")]
#[inline(always)]
fn load_group(buffer: &[u16], at: usize) -> u64 {
    match buffer.get(at..at.wrapping_add(4)) {
        Some(&[a, b, c, d]) => pack([a, b, c, d]),
        _ => pack_padded(buffer.get(at..).unwrap_or_default(), 0),
    }
}

/// Whether `a[a_start..a_start + len]` equals `b[b_start..b_start + len]`, both upcased: [`eq_ignore_case`] four
/// units at a time. The last, partial group is always compared, with the lanes past `len` masked off (all of them
/// when there is none), so the only loop is over whole groups and both buffers may hold anything after the texts.
#[inline]
fn eq_upcased_in(a: &[u16], a_start: usize, b: &[u16], b_start: usize, len: usize) -> bool {
    // The differences are gathered without a branch per group: in mixed-case names whether two groups are
    // equal before upcasing is a coin toss that the branch predictor would lose.
    let mut difference = 0u64;
    let whole = len & !3;
    let mut done = 0usize;
    while done < whole {
        let x = load_group(a, a_start.wrapping_add(done));
        let y = load_group(b, b_start.wrapping_add(done));
        difference |= upcase_lanes(x) ^ upcase_lanes(y);
        done = done.wrapping_add(4);
    }
    let mask = 1u64.wrapping_shl(to_u32(len & 3).wrapping_mul(16)).wrapping_sub(1);
    let x = load_group(a, a_start.wrapping_add(whole)) & mask;
    let y = load_group(b, b_start.wrapping_add(whole)) & mask;
    difference | (upcase_lanes(x) ^ upcase_lanes(y)) == 0
}

/// One component of a path, as [`scan_component`] read it.
struct Scanned {
    /// Where the component ends (a separator or the path's end).
    end: usize,
    /// The hash state of the component's upcased text, for [`key_hash`].
    text: u64,
    colon: bool,
    /// Whether the component holds a `~`; only looked for if `TILDE`.
    tilde: bool,
}

/// Reads the component starting at `start` (not a separator) in one pass: its end, its text's hash state, whether
/// it holds a `:` and (if `TILDE`) a `~`. Four units per step; the units past the path's end read as separators.
#[expect(
    clippy::inline_always,
    reason = "measured: as a call, every component pays for saving and restoring registers"
)]
#[inline(always)]
fn scan_component<const TILDE: bool>(path: &[u16], start: usize) -> Scanned {
    let mut hash = TEXT_SEED;
    let mut colon = 0u64;
    let mut tilde = 0u64;
    let tail = path.get(start..).unwrap_or_default();
    let mut chunks = tail.chunks_exact(4);
    let mut at = start;
    let last = loop {
        let Some(&[a, b, c, d]) = chunks.next() else {
            break pack_padded(chunks.remainder(), SEPARATOR);
        };
        let lanes = pack([a, b, c, d]);
        if lanes_equal(lanes, LANES_SEPARATOR) != 0 {
            break lanes;
        }
        colon |= lanes_equal(lanes, LANES_COLON);
        if TILDE {
            tilde |= lanes_equal(lanes, LANES_TILDE);
        }
        hash = hash_mix(hash, upcase_lanes(lanes));
        at = at.saturating_add(4);
    };
    // `last` holds a separator: keep the lanes before the first one.
    let lane_bits = lanes_equal(last, LANES_SEPARATOR).trailing_zeros().saturating_sub(15);
    let lanes = last & 1u64.wrapping_shl(lane_bits).wrapping_sub(1);
    colon |= lanes_equal(lanes, LANES_COLON);
    if TILDE {
        tilde |= lanes_equal(lanes, LANES_TILDE);
    }
    hash = hash_mix(hash, upcase_lanes(lanes));
    let end = at.saturating_add((lane_bits / 16) as usize);
    Scanned { end, text: hash, colon: colon != 0, tilde: tilde != 0 }
}

fn span_len(len: usize) -> Option<u16> {
    u16::try_from(len).ok()
}

fn to_u16(value: usize) -> u16 {
    // Every offset stored is bounded by MAX_PATH_UNITS, which fits.
    u16::try_from(value).unwrap_or(u16::MAX)
}

fn to_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn oom(_: TryReserveError) -> PolicyError {
    PolicyError::whole(Problem::OutOfMemory)
}

/// The checked parts of one path field.
struct CheckedPath<'s> {
    volume: Volume,
    path: &'s [u16],
    path_offset: usize,
}

fn check_text(rule: usize, field: Field, text: &[u16], max: usize) -> Result<(), PolicyError> {
    if text.is_empty() {
        return Err(PolicyError::at(rule, field, Problem::Empty));
    }
    if text.len() > max {
        return Err(PolicyError::at(rule, field, Problem::TooLong));
    }
    if !is_valid_utf16(text) {
        return Err(PolicyError::at(rule, field, Problem::InvalidUtf16));
    }
    Ok(())
}

fn check_path(
    rule: usize,
    field: Field,
    text: &[u16],
    wildcards: bool,
    volumes: VolumeNames,
) -> Result<CheckedPath<'_>, PolicyError> {
    let fail = |problem| PolicyError::at(rule, field, problem);
    check_text(rule, field, text, MAX_PATH_UNITS)?;
    let (volume, path) = split_volume(text).ok_or_else(|| fail(Problem::NotAbsolute))?;
    if matches!(volume, Volume::Letter(_)) && volumes == VolumeNames::GuidsOnly {
        return Err(fail(Problem::DriveLetter));
    }
    let path_offset = text.len().saturating_sub(path.len());
    let inner = path.get(1..).unwrap_or_default();
    if inner.is_empty() {
        return Err(fail(Problem::VolumeRoot));
    }
    for component in inner.split(|&u| u == SEPARATOR) {
        if component.is_empty() {
            return Err(fail(Problem::EmptyComponent));
        }
        check_component(component, wildcards).map_err(|fault| fail(fault_problem(fault)))?;
        // A `**` inside a component needs a `*`, which `has_special_units` reports.
        if wildcards
            && component != GLOBSTAR
            && name::has_special_units(component)
            && component.windows(2).any(|pair| pair == GLOBSTAR)
        {
            return Err(fail(Problem::MisplacedGlobstar));
        }
    }
    Ok(CheckedPath { volume, path, path_offset })
}

fn fault_problem(fault: name::ComponentFault) -> Problem {
    match fault {
        name::ComponentFault::Dots => Problem::DotComponent,
        name::ComponentFault::TrailingDotOrSpace => Problem::TrailingDotOrSpace,
        name::ComponentFault::Invalid(unit) => Problem::InvalidCharacter(unit),
        name::ComponentFault::Wildcard => Problem::Wildcard,
        name::ComponentFault::Stream => Problem::Stream,
    }
}

/// The volumes one rule names, while the volume table is built.
struct RuleVolumes {
    source: Volume,
    target: Volume,
    process: Option<Volume>,
}

impl CompiledPolicy {
    /// Validates `specs` as a whole and compiles them.
    ///
    /// # Errors
    /// The first problem found, naming the rule (by index) and field: see [`Problem`]. Rules are checked one by one
    /// in order, then names for duplicates, then targets for redirect cycles.
    pub fn new(specs: &[RuleSpec], volumes: VolumeNames) -> Result<Self, PolicyError> {
        if specs.len() > MAX_RULES {
            return Err(PolicyError::whole(Problem::TooManyRules));
        }
        let mut policy = Self::default();
        let total_units = specs.iter().fold(0usize, |sum, spec| {
            sum.saturating_add(spec.name.len())
                .saturating_add(spec.source.len())
                .saturating_add(spec.target.len())
                .saturating_add(spec.process.as_ref().map_or(0, Vec::len))
        });
        policy.arena.try_reserve_exact(total_units).map_err(oom)?;
        policy.rules.try_reserve_exact(specs.len()).map_err(oom)?;
        let mut rule_volumes: Vec<RuleVolumes> = Vec::new();
        rule_volumes.try_reserve_exact(specs.len()).map_err(oom)?;
        for (index, spec) in specs.iter().enumerate() {
            let (rule, named) = policy.add_strings(index, spec, volumes)?;
            policy.rules.push(rule);
            rule_volumes.push(named);
        }
        policy.build_volumes(&rule_volumes)?;
        drop(rule_volumes);
        policy.check_duplicate_names()?;
        policy.rank()?;
        policy.build_trie()?;
        policy.check_cycles()?;
        Ok(policy)
    }

    /// Checks one rule's fields and appends its strings to the arena.
    fn add_strings(
        &mut self,
        index: usize,
        spec: &RuleSpec,
        volumes: VolumeNames,
    ) -> Result<(CompiledRule, RuleVolumes), PolicyError> {
        check_text(index, Field::Name, &spec.name, MAX_NAME_UNITS)?;
        if let Some(&unit) = spec.name.iter().find(|&&u| u < 0x20) {
            return Err(PolicyError::at(index, Field::Name, Problem::InvalidCharacter(unit)));
        }
        let source = check_path(index, Field::Source, &spec.source, true, volumes)?;
        let target = check_path(index, Field::Target, &spec.target, false, volumes)?;
        let (process_kind, process_volume, process_path) = match &spec.process {
            None => (ProcessKind::Any, None, 0),
            Some(process) if process.contains(&SEPARATOR) => {
                let checked = check_path(index, Field::Process, process, false, volumes)?;
                (ProcessKind::Path, Some(checked.volume), checked.path_offset)
            }
            Some(process) => {
                check_text(index, Field::Process, process, MAX_PATH_UNITS)?;
                check_component(process, false)
                    .map_err(|fault| PolicyError::at(index, Field::Process, fault_problem(fault)))?;
                (ProcessKind::Name, None, 0)
            }
        };
        let shape: Shape = pattern::shape(source.path);
        let start = to_u32(self.arena.len());
        let process_text = spec.process.as_deref().unwrap_or_default();
        // The arena was reserved for every string up front, so this never reallocates.
        for text in [&spec.name[..], &spec.source, &spec.target, process_text] {
            self.arena.extend_from_slice(text);
        }
        let rule = CompiledRule {
            start,
            name_len: span_len(spec.name.len()).unwrap_or(0),
            source_len: span_len(spec.source.len()).unwrap_or(0),
            target_len: span_len(spec.target.len()).unwrap_or(0),
            process_len: span_len(process_text.len()).unwrap_or(0),
            source_path: to_u16(source.path_offset),
            target_path: to_u16(target.path_offset),
            process_path: to_u16(process_path),
            rest: to_u16(source.path_offset.saturating_add(shape.rest)),
            suffix: to_u16(source.path_offset.saturating_add(shape.suffix)),
            prefix_components: to_u16(shape.prefix_components),
            source_volume: 0,
            target_volume: 0,
            process_volume: 0,
            class: shape.class,
            method: spec.method,
            access: spec.access,
            process_kind,
            // Ranks are assigned once every rule is known; the wildcard count waits here until then.
            rank: to_u32(shape.wildcards),
            next: NIL,
        };
        Ok((rule, RuleVolumes { source: source.volume, target: target.volume, process: process_volume }))
    }

    fn build_volumes(&mut self, named: &[RuleVolumes]) -> Result<(), PolicyError> {
        let mut all: Vec<Volume> = Vec::new();
        all.try_reserve_exact(named.len().saturating_mul(3)).map_err(oom)?;
        // Policies name few volumes, so most are repeats of one seen just before: leaving those out here keeps the
        // sort below (of 16-byte GUIDs) short. Anything left in twice is removed by `dedup`.
        let add = |all: &mut Vec<Volume>, volume: Volume| {
            if !all.iter().rev().take(8).any(|&seen| seen == volume) {
                all.push(volume);
            }
        };
        for rule in named {
            add(&mut all, rule.source);
            add(&mut all, rule.target);
            if let Some(process) = rule.process {
                add(&mut all, process);
            }
        }
        all.sort_unstable();
        all.dedup();
        if all.len() > usize::from(u16::MAX) {
            return Err(PolicyError::whole(Problem::TooManyVolumes));
        }
        self.volumes.try_reserve_exact(all.len()).map_err(oom)?;
        self.volumes.extend_from_slice(&all);
        drop(all);
        let index_of = |volumes: &[Volume], volume: Volume| to_u16(volumes.binary_search(&volume).unwrap_or(0));
        for (rule, named) in self.rules.iter_mut().zip(named) {
            rule.source_volume = index_of(&self.volumes, named.source);
            rule.target_volume = index_of(&self.volumes, named.target);
            rule.process_volume = named.process.map_or(0, |v| index_of(&self.volumes, v));
        }
        Ok(())
    }

    fn text(&self, span: Span) -> &[u16] {
        let start = span.start as usize;
        self.arena.get(start..start.saturating_add(usize::from(span.len))).unwrap_or_default()
    }

    fn check_duplicate_names(&self) -> Result<(), PolicyError> {
        let mut order: Vec<u32> = Vec::new();
        order.try_reserve_exact(self.rules.len()).map_err(oom)?;
        order.extend((0..self.rules.len()).map(to_u32));
        let name_of = |i: u32| self.rules.get(i as usize).map_or(&[][..], |r| self.text(r.name()));
        // A stable sort keeps equal names in file order, so the later one is reported.
        order.sort_by(|&a, &b| name_of(a).cmp(name_of(b)));
        for pair in order.windows(2) {
            if let [first, second] = *pair
                && name_of(first) == name_of(second)
            {
                return Err(PolicyError::at(second as usize, Field::Name, Problem::DuplicateName(first as usize)));
            }
        }
        Ok(())
    }

    /// Orders the rules by specificity: exact sources first, then longer literal prefixes, then fewer wildcards,
    /// then file order. Rank 0 is the most specific.
    fn rank(&mut self) -> Result<(), PolicyError> {
        // The key packed into one integer, so that the sort compares integers and never reads a rule: a pattern
        // bit, the complement of the prefix's component count, the wildcard count (`rank` still holds it) and
        // the index. Each field fits: components and wildcards are bounded by `MAX_PATH_UNITS` (15 bits), the
        // index by `MAX_RULES` (17 bits).
        let mut keys: Vec<u64> = Vec::new();
        keys.try_reserve_exact(self.rules.len()).map_err(oom)?;
        keys.extend(self.rules.iter().enumerate().map(|(i, r)| {
            let pattern = u64::from(r.class != PatternClass::Exact);
            let shorter = u64::from(u16::MAX.saturating_sub(r.prefix_components));
            let wildcards = u64::from(r.rank.min(u32::from(u16::MAX)));
            pattern << 63 | shorter << 47 | wildcards << 31 | (i as u64 & 0x7FFF_FFFF)
        }));
        keys.sort_unstable();
        for (rank, &key) in keys.iter().enumerate() {
            if let Some(rule) = self.rules.get_mut((key & 0x7FFF_FFFF) as usize) {
                rule.rank = to_u32(rank);
            }
        }
        Ok(())
    }

    fn build_trie(&mut self) -> Result<(), PolicyError> {
        // At most one node per volume, literal prefix component and suffix rule: size the tables for that once,
        // so that building never grows them; they are cut to size at the end.
        let most = self.rules.iter().fold(self.volumes.len(), |sum, rule| {
            let suffix = usize::from(rule.class == PatternClass::SubtreeSuffix);
            sum.saturating_add(usize::from(rule.prefix_components)).saturating_add(suffix)
        });
        let mut hashes: Vec<u32> = Vec::new();
        hashes.try_reserve_exact(most).map_err(oom)?;
        self.nodes.try_reserve_exact(most).map_err(oom)?;
        for _ in 0..self.volumes.len() {
            self.nodes.push(Node::new(NIL, Span::default(), 0));
            hashes.push(0);
        }
        self.index_mask = u32::MAX;
        self.verify_bit = 0;
        self.grow_slots(most.saturating_mul(2).max(8), &hashes)?;
        // Insert in reverse rank order and prepend, so every list ends up best first.
        let mut order: Vec<u32> = Vec::new();
        order.try_reserve_exact(self.rules.len()).map_err(oom)?;
        order.resize(self.rules.len(), 0);
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(slot) = order.get_mut(rule.rank as usize) {
                *slot = to_u32(i);
            }
        }
        for &i in order.iter().rev() {
            self.insert_rule(i, &mut hashes)?;
        }
        drop(order);
        // Rules share prefixes, so the tables were sized for more nodes than there are: keep exact copies, and
        // a slot table at most two-thirds full whose entries carry hash bits (a probe passes over another key's
        // entry without reading its node, so the longer runs of a fuller table cost little).
        if self.nodes.len() < self.nodes.capacity() {
            let mut nodes = Vec::new();
            nodes.try_reserve_exact(self.nodes.len()).map_err(oom)?;
            nodes.extend_from_slice(&self.nodes);
            self.nodes = nodes;
        }
        let index_bits = u32::BITS.saturating_sub(to_u32(self.nodes.len()).leading_zeros());
        self.index_mask = 1u32.checked_shl(index_bits).map_or(u32::MAX, |bit| bit.wrapping_sub(1));
        self.verify_bit = 1u32.checked_shl(index_bits).unwrap_or(0);
        let nodes = self.nodes.len();
        self.grow_slots(nodes.saturating_add(nodes.wrapping_shr(1)).max(8), &hashes)?;
        self.build_filter(&hashes)
    }

    /// Builds [`Self::filter`]: 8 to 16 bits per node, a power of two of words.
    fn build_filter(&mut self, hashes: &[u32]) -> Result<(), PolicyError> {
        if self.nodes.len() < FILTER_MIN_NODES {
            return Ok(());
        }
        let words =
            self.nodes.len().div_ceil(8).checked_next_power_of_two().ok_or(PolicyError::whole(Problem::OutOfMemory))?;
        let mut filter: Vec<u64> = Vec::new();
        filter.try_reserve_exact(words).map_err(oom)?;
        filter.resize(words, 0);
        let bits = words.trailing_zeros();
        for (node, &hash) in self.nodes.iter().zip(hashes) {
            if node.parent != NIL {
                let (word, mask) = filter_position(hash, bits);
                if let Some(word) = filter.get_mut(word) {
                    *word |= mask;
                }
            }
        }
        self.filter = filter;
        self.filter_bits = bits;
        Ok(())
    }

    fn insert_rule(&mut self, index: u32, hashes: &mut Vec<u32>) -> Result<(), PolicyError> {
        let Some(&rule) = self.rules.get(index as usize) else { return Ok(()) };
        let mut node = u32::from(rule.source_volume);
        let source_start = rule.source().start as usize;
        let prefix_end = source_start.saturating_add(usize::from(rule.rest));
        let path_start = source_start.saturating_add(usize::from(rule.source_path));
        let arena_len = self.arena.len();
        let mut position = path_start;
        for _ in 0..rule.prefix_components {
            // Find the next component of the literal prefix in the arena.
            let rest = self.arena.get(position..prefix_end.min(arena_len)).unwrap_or_default();
            let skip = rest.iter().take_while(|&&u| u == SEPARATOR).count();
            let start = position.saturating_add(skip);
            let length =
                self.arena.get(start..prefix_end).unwrap_or_default().iter().take_while(|&&u| u != SEPARATOR).count();
            position = start.saturating_add(length);
            let span = Span { start: to_u32(start), len: span_len(length).unwrap_or(0) };
            node = self.child_or_insert(node, 0, span, hashes)?;
        }
        let list = match rule.class {
            PatternClass::Exact => self.nodes.get_mut(node as usize).map(|n| &mut n.rules),
            PatternClass::Subtree | PatternClass::Glob => self.nodes.get_mut(node as usize).map(|n| {
                n.flags |= if rule.class == PatternClass::Glob { NODE_HAS_GLOB } else { NODE_HAS_SUBTREE };
                &mut n.rules
            }),
            PatternClass::SubtreeSuffix => {
                let suffix_start = source_start.saturating_add(usize::from(rule.suffix));
                let suffix_end = source_start.saturating_add(usize::from(rule.source_len));
                let suffix = self.arena.get(suffix_start..suffix_end).unwrap_or_default();
                let dot = suffix.iter().rposition(|&u| u == DOT).unwrap_or(0);
                let key_start = suffix_start.saturating_add(dot);
                let span =
                    Span { start: to_u32(key_start), len: span_len(suffix_end.saturating_sub(key_start)).unwrap_or(0) };
                if let Some(parent) = self.nodes.get_mut(node as usize) {
                    parent.flags |= NODE_HAS_SUFFIXES;
                }
                let key = self.child_or_insert(node, NODE_SUFFIX_KEY, span, hashes)?;
                self.nodes.get_mut(key as usize).map(|n| &mut n.rules)
            }
        };
        if let Some(head) = list {
            let previous = *head;
            *head = index;
            if let Some(rule) = self.rules.get_mut(index as usize) {
                rule.next = previous;
            }
        }
        Ok(())
    }

    fn child_or_insert(
        &mut self,
        parent: u32,
        kind: u8,
        text: Span,
        hashes: &mut Vec<u32>,
    ) -> Result<u32, PolicyError> {
        let text_units = self.text(text);
        let hash = hash_key(parent, kind, text_units);
        if let Some(found) = self.lookup::<true>(parent, kind, hash, text_units, 0, text_units.len()) {
            return Ok(found);
        }
        if self.nodes.len().saturating_add(1).saturating_mul(2) > self.slots.len() {
            self.grow_slots(self.slots.len().saturating_mul(2), hashes)?;
        }
        self.nodes.try_reserve(1).map_err(oom)?;
        hashes.try_reserve(1).map_err(oom)?;
        let index = to_u32(self.nodes.len());
        if index == NIL {
            return Err(PolicyError::whole(Problem::OutOfMemory));
        }
        self.nodes.push(Node::new(parent, text, kind));
        hashes.push(hash);
        if let Some(parent) = self.nodes.get_mut(parent as usize)
            && kind == 0
        {
            parent.flags |= NODE_HAS_CHILDREN;
        }
        self.place(index, hash);
        Ok(index)
    }

    /// Replaces the slot table with one of `wanted` slots (rounded up to a power of two) holding every node.
    fn grow_slots(&mut self, wanted: usize, hashes: &[u32]) -> Result<(), PolicyError> {
        let capacity = wanted.checked_next_power_of_two().ok_or(PolicyError::whole(Problem::OutOfMemory))?;
        let mut slots: Vec<u32> = Vec::new();
        slots.try_reserve_exact(capacity).map_err(oom)?;
        slots.resize(capacity, NIL);
        self.slots = slots;
        for (index, &hash) in hashes.iter().enumerate() {
            if self.nodes.get(index).is_some_and(|node| node.parent != NIL) {
                self.place(to_u32(index), hash);
            }
        }
        Ok(())
    }

    /// Puts node `index` with `hash` in its slot. A probe for a key stops at an entry whose hash bits are its own;
    /// such entries lie between the key's home slot and its own entry, so this probe, or the later one of the
    /// other key, passes them: both get `verify_bit`.
    fn place(&mut self, index: u32, hash: u32) {
        let mask = self.slots.len().saturating_sub(1);
        let hash_bits = !(self.index_mask | self.verify_bit);
        let mut entry = index | (hash & hash_bits);
        let mut slot = hash as usize & mask;
        for _ in 0..self.slots.len() {
            let Some(occupant) = self.slots.get_mut(slot) else { return };
            if *occupant == NIL {
                *occupant = entry;
                return;
            }
            if (*occupant ^ hash) & hash_bits == 0 {
                *occupant |= self.verify_bit;
                entry |= self.verify_bit;
            }
            slot = slot.wrapping_add(1) & mask;
        }
    }

    /// Finds the child of `parent` named `text[start..start + len]` (upcased comparison). Probes at most the whole
    /// table, which is at most two-thirds full, so it ends; on a policy's own keys the chains are short. An entry
    /// whose hash differs is skipped without reading its node.
    ///
    /// With `VERIFY` false, an entry with the key's hash bits (the hash covers the parent, the kind, the length and
    /// the upcased text) is taken without reading its node unless it is flagged: a probe never stops at an unflagged
    /// entry of another of the trie's keys, so an existing child is always found, but a name no key has may, rarely,
    /// be taken for one. A walk made that way is a superset of the exact walk; [`match_path`](Self::match_path) and
    /// [`could_match`](Self::could_match) redo with `VERIFY` the rare walks whose answer is not "no".
    #[expect(clippy::inline_always, reason = "measured: a call per component costs the walk more than the copy")]
    #[inline(always)]
    fn lookup<const VERIFY: bool>(
        &self,
        parent: u32,
        kind: u8,
        hash: u32,
        text: &[u16],
        start: usize,
        len: usize,
    ) -> Option<u32> {
        if !self.filter.is_empty() {
            let (word, bits) = filter_position(hash, self.filter_bits);
            if self.filter.get(word).is_none_or(|&w| w & bits != bits) {
                return None;
            }
        }
        let mask = self.slots.len().checked_sub(1)?;
        let mut slot = hash as usize & mask;
        loop {
            let entry = *self.slots.get(slot)?;
            if entry == NIL {
                return None;
            }
            if (entry ^ hash) & !(self.index_mask | self.verify_bit) == 0 {
                let index = entry & self.index_mask;
                if !VERIFY && self.verify_bit != 0 && entry & self.verify_bit == 0 {
                    return Some(index);
                }
                let node = self.nodes.get(index as usize)?;
                if node.parent == parent
                    && node.flags & NODE_SUFFIX_KEY == kind
                    && usize::from(node.text_len) == len
                    && eq_upcased_in(&self.arena, node.text_start as usize, text, start, len)
                {
                    return Some(index);
                }
            }
            slot = slot.wrapping_add(1) & mask;
        }
    }

    fn child(&self, parent: u32, kind: u8, text: &[u16]) -> Option<u32> {
        self.lookup::<true>(parent, kind, hash_key(parent, kind, text), text, 0, text.len())
    }

    fn volume_root(&self, volume: &Volume) -> Option<u32> {
        // Policies name few volumes; comparing for equality is cheaper than ordering them.
        if self.volumes.len() <= 8 {
            return self.volumes.iter().position(|v| v == volume).map(to_u32);
        }
        self.volumes.binary_search(volume).ok().map(to_u32)
    }

    /// The volume's trie root, if any rule's source is on the volume (the table also lists target volumes).
    fn source_root(&self, volume: &Volume) -> Option<u32> {
        let root = self.volume_root(volume)?;
        let node = self.nodes.get(root as usize)?;
        let used = node.flags & (NODE_HAS_CHILDREN | NODE_HAS_SUFFIXES) != 0 || node.rules != NIL;
        used.then_some(root)
    }

    /// Rejects a policy where a rule's target lies inside a rule's source.
    fn check_cycles(&self) -> Result<(), PolicyError> {
        for (index, rule) in self.rules.iter().enumerate() {
            let target = self.text(rule.target());
            let path = target.get(usize::from(rule.target_path)..).unwrap_or_default();
            let volume = self.volumes.get(usize::from(rule.target_volume));
            let Some(root) = volume.and_then(|v| self.volume_root(v)) else { continue };
            // A directory target (any non-exact source) conflicts with sources at or below it; a file target only
            // with sources that match it.
            let directory = rule.class != PatternClass::Exact;
            if let Some(other) = self.source_covering(root, path, directory) {
                return Err(PolicyError::at(index, Field::Target, Problem::TargetInsideSource(other as usize)));
            }
        }
        Ok(())
    }

    fn source_covering(&self, root: u32, path: &[u16], directory: bool) -> Option<u32> {
        let mut node = root;
        let final_component = Components::new(path).last().map_or(&[][..], |(_, c)| c);
        let extension = final_component.iter().rposition(|&u| u == DOT).and_then(|d| final_component.get(d..));
        for (start, component) in Components::new(path) {
            let current = self.nodes.get(node as usize)?;
            if let Some(rule) = self.first_of(current, PatternClass::Subtree) {
                return Some(rule);
            }
            let below = path.get(start..).unwrap_or_default();
            if current.flags & NODE_HAS_SUFFIXES != 0 {
                if directory {
                    if let Some(rule) = self.first_suffix_rule_below(node) {
                        return Some(rule);
                    }
                } else if let Some(extension) = extension
                    && let Some(key) = self.child(node, NODE_SUFFIX_KEY, extension)
                {
                    let mut rule = self.nodes.get(key as usize)?.rules;
                    while let Some(r) = self.rules.get(rule as usize) {
                        if self.suffix_matches(r, final_component, false) {
                            return Some(rule);
                        }
                        rule = r.next;
                    }
                }
            }
            let mut rule = current.rules;
            while let Some(r) = self.rules.get(rule as usize) {
                if r.class != PatternClass::Glob {
                    rule = r.next;
                    continue;
                }
                let pattern = self.source_rest(r);
                let hit = if directory {
                    pattern::could_match_at_or_below(pattern, below)
                } else {
                    pattern::components_match(pattern, below, false)
                };
                if hit {
                    return Some(rule);
                }
                rule = r.next;
            }
            match self.child(node, 0, component) {
                Some(next) => node = next,
                None => return None,
            }
        }
        let last = self.nodes.get(node as usize)?;
        if let Some(rule) = self.first_of(last, PatternClass::Exact) {
            return Some(rule);
        }
        if directory {
            // Any source below the target directory: every trie node below exists because some rule needs it.
            if let Some(rule) = self.first_of(last, PatternClass::Subtree) {
                return Some(rule);
            }
            if let Some(rule) = self.first_of(last, PatternClass::Glob) {
                return Some(rule);
            }
            if last.flags & (NODE_HAS_CHILDREN | NODE_HAS_SUFFIXES) != 0 {
                return self.any_rule_below(node);
            }
        }
        None
    }

    fn first_suffix_rule_below(&self, parent: u32) -> Option<u32> {
        // Suffix-key nodes are few; find one whose parent is `parent` by scanning the nodes. This runs only
        // during validation and only for targets that pass through a directory with suffix rules.
        self.nodes.iter().find(|n| n.parent == parent && n.flags & NODE_SUFFIX_KEY != 0).map(|n| n.rules)
    }

    /// The best rule of `class` in a node's list (validation only).
    fn first_of(&self, node: &Node, class: PatternClass) -> Option<u32> {
        let mut rule = node.rules;
        while let Some(r) = self.rules.get(rule as usize) {
            if r.class == class {
                return Some(rule);
            }
            rule = r.next;
        }
        None
    }

    fn any_rule_below(&self, ancestor: u32) -> Option<u32> {
        // Validation only: find any rule whose literal prefix passes through `ancestor`.
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            let mut node = u32::from(rule.source_volume);
            let source = self.text(rule.source());
            let prefix = source.get(usize::from(rule.source_path)..usize::from(rule.rest)).unwrap_or_default();
            for (_, component) in Components::new(prefix) {
                node = self.child(node, 0, component)?;
                if node == ancestor {
                    return Some(to_u32(index));
                }
            }
            None
        })
    }

    fn source_rest(&self, rule: &CompiledRule) -> &[u16] {
        self.text(rule.source()).get(usize::from(rule.rest)..).unwrap_or_default()
    }

    fn suffix_matches(&self, rule: &CompiledRule, final_component: &[u16], case_sensitive: bool) -> bool {
        let suffix = self.text(rule.source()).get(usize::from(rule.suffix)..).unwrap_or_default();
        final_component.len() >= suffix.len()
            && final_component
                .get(final_component.len().saturating_sub(suffix.len())..)
                .is_some_and(|tail| name_eq(tail, suffix, case_sensitive))
    }

    /// Whether the rule's literal prefix equals the path's first components exactly (for case-sensitive creates;
    /// the trie already compared them case-insensitively).
    fn literal_prefix_exact(&self, rule: &CompiledRule, name: &[u16]) -> bool {
        let source = self.text(rule.source());
        let prefix = source.get(usize::from(rule.source_path)..usize::from(rule.rest)).unwrap_or_default();
        Components::new(prefix).zip(Components::new(name)).all(|((_, a), (_, b))| a == b)
    }

    fn process_matches(&self, rule: &CompiledRule, process: ProcessFilter<'_>) -> bool {
        let ProcessFilter::Image(image) = process else { return true };
        match rule.process_kind {
            ProcessKind::Any => true,
            ProcessKind::Name => image.is_some_and(|image| {
                let file_name = image.rsplit(|&u| u == SEPARATOR).next().unwrap_or(image);
                eq_ignore_case(file_name, self.text(rule.process()))
            }),
            ProcessKind::Path => image.and_then(split_volume).is_some_and(|(volume, path)| {
                let wanted = self.text(rule.process()).get(usize::from(rule.process_path)..).unwrap_or_default();
                self.volumes.get(usize::from(rule.process_volume)) == Some(&volume) && eq_ignore_case(path, wanted)
            }),
        }
    }

    /// Walks one list (best first) and returns the first rule that passes the filter and `extra`.
    fn best_in_list(
        &self,
        mut rule: u32,
        beat: u32,
        filter: Filter<'_>,
        name: &[u16],
        extra: impl Fn(&CompiledRule) -> bool,
    ) -> Option<(u32, u32)> {
        while let Some(r) = self.rules.get(rule as usize) {
            if r.rank >= beat {
                return None;
            }
            if self.process_matches(r, filter.process)
                && (!filter.case_sensitive || self.literal_prefix_exact(r, name))
                && extra(r)
            {
                return Some((rule, r.rank));
            }
            rule = r.next;
        }
        None
    }

    /// Splits the stream suffix off the last component. Faults in other components are found by [`Self::walk`].
    pub(crate) fn parse(path: &[u16]) -> Result<Parsed<'_>, NameError> {
        let end = path.iter().rposition(|&u| u != SEPARATOR).map_or(0, |p| p.saturating_add(1));
        let trimmed = path.get(..end).unwrap_or_default();
        let final_start = trimmed.iter().rposition(|&u| u == SEPARATOR).map_or(0, |p| p.saturating_add(1));
        let final_full = trimmed.get(final_start..).unwrap_or_default();
        let colon = final_full.iter().position(|&u| u == COLON);
        if colon == Some(0) {
            return Err(NameError::StreamWithoutName);
        }
        let base_end = final_start.saturating_add(colon.unwrap_or(final_full.len()));
        let name = path.get(..base_end).unwrap_or_default();
        let mut stream = trimmed.get(base_end..).unwrap_or_default();
        if name::is_default_stream(stream) {
            stream = &[];
        }
        let final_component = name.get(final_start.min(base_end)..).unwrap_or_default();
        let extension = final_component.iter().rposition(|&u| u == DOT).and_then(|d| final_component.get(d..));
        Ok(Parsed { name, stream, extension, final_component })
    }

    /// Walks the trie along the path once, reading each component in one pass (its end, its upcased hash, any `:`
    /// or `~`) and leaving at the first component no rule's literal prefix continues with — most names leave
    /// within a few components, so the rest of the path is only checked for the rare `:` (and, for `could_match`,
    /// `~`) in one branch-free pass. At each node it tries the node's subtree, suffix and glob rules on what lies
    /// below; at the end, the exact rules. Deeper nodes have longer literal prefixes, so a later candidate always
    /// outranks an earlier one of the same list kind, and ranks decide between kinds.
    ///
    /// The result, errors included, is what walking [`Self::parse`]'s name would give after `parse` itself: a
    /// stream without a file name is reported before any other fault, and only where the walk would otherwise
    /// have succeeded is the full parse done (when the path holds a `:` it has not examined).
    ///
    /// `TILDE` (for `could_match`) also looks for `~` in every component of the name.
    fn walk<const TILDE: bool, const VERIFY: bool>(
        &self,
        root: u32,
        path: &[u16],
        filter: Filter<'_>,
    ) -> Result<Walk, NameError> {
        let mut best: Option<Found> = None;
        let mut tilde = false;
        let mut node = root;
        let mut parsed: Option<Parsed<'_>> = None;
        let Some(mut start) = path.iter().position(|&u| u != SEPARATOR) else {
            // No component: only the root's exact rules could match, and sources always name a component.
            return Ok(Walk { found: None, tilde });
        };
        loop {
            let current = self.nodes.get(node as usize).ok_or(NameError::DotComponent)?;
            let scanned = scan_component::<TILDE>(path, start);
            let mut end = scanned.end;
            let mut hash = key_hash(node, 0, scanned.text, end.saturating_sub(start));
            // Where the next component starts, if there is one: only looked for once the walk goes on, or where
            // the component names a stream, which only the last one may.
            let next_start = || {
                let after = path.get(scanned.end..).unwrap_or_default();
                after.iter().position(|&u| u != SEPARATOR).map(|skip| scanned.end.saturating_add(skip))
            };
            if scanned.colon {
                let colon = path.get(start..end).and_then(|c| c.iter().position(|&u| u == COLON));
                let Some(colon) = colon.filter(|_| next_start().is_none()) else {
                    return Err(Self::parse(path).err().unwrap_or(NameError::StreamOnDirectory));
                };
                if colon == 0 {
                    return Err(NameError::StreamWithoutName);
                }
                // The last component names a stream: the name ends at its first `:`.
                end = start.saturating_add(colon);
                let component = path.get(start..end).unwrap_or_default();
                hash = hash_key(node, 0, component);
                tilde |= TILDE && component.contains(&name::TILDE);
            } else {
                tilde |= scanned.tilde;
            }
            let component = path.get(start..end).unwrap_or_default();
            if component.len() <= 2 && name::is_dot_component(component) {
                return Err(Self::parse(path).err().unwrap_or(NameError::DotComponent));
            }
            if current.has_rules_below() {
                let below = match &parsed {
                    Some(below) => below,
                    None => parsed.insert(Self::parse(path)?),
                };
                self.try_below(node, current, below, filter, start, &mut best);
            }
            let Some(child) = self.lookup::<VERIFY>(node, 0, hash, path, start, end.saturating_sub(start)) else {
                // No rule's literal prefix continues here, so no later component can make the name match: a
                // stream on a later directory does not change which file it is, and a later `..` that led back
                // would have to be resolved, which NTFS and ReFS never do (they fail the create). Only a stream
                // without a file name is still an error, and only `could_match` looks further, for 8.3 aliases.
                let rest = path.get(end..).unwrap_or_default();
                let (mut colon, mut rest_tilde) = (false, false);
                if TILDE {
                    for &unit in rest {
                        colon |= unit == COLON;
                        rest_tilde |= unit == name::TILDE;
                    }
                } else {
                    // A branch-free reduction (it vectorizes), not an early-exit search.
                    colon = rest.iter().fold(0u16, |colon, &unit| colon | u16::from(unit == COLON)) != 0;
                }
                if colon {
                    let whole = Self::parse(path)?;
                    rest_tilde = whole.name.get(end..).unwrap_or_default().contains(&name::TILDE);
                }
                return Ok(Walk { found: best, tilde: tilde || (TILDE && rest_tilde) });
            };
            node = child;
            let Some(next) = next_start() else {
                // The name's last component: the node's exact rules.
                let list = self.nodes.get(node as usize).map_or(NIL, |n| n.rules);
                let to_beat = best.as_ref().map_or(u32::MAX, |b| b.rank);
                if list != NIL {
                    let name = path.get(..end).unwrap_or_default();
                    let exact = |r: &CompiledRule| r.class == PatternClass::Exact;
                    if let Some((rule, rank)) = self.best_in_list(list, to_beat, filter, name, exact) {
                        best = Some(Found { rule, rank, remainder_start: end });
                    }
                }
                return Ok(Walk { found: best, tilde });
            };
            start = next;
        }
    }

    /// Tries the subtree, suffix and glob rules of `node` on the part of the name from `start` on.
    fn try_below(
        &self,
        node: u32,
        current: &Node,
        parsed: &Parsed<'_>,
        filter: Filter<'_>,
        start: usize,
        best: &mut Option<Found>,
    ) {
        let name = parsed.name;
        let mut consider = |list: u32, extra: &dyn Fn(&CompiledRule) -> bool| {
            let to_beat = best.as_ref().map_or(u32::MAX, |b| b.rank);
            if let Some((rule, rank)) = self.best_in_list(list, to_beat, filter, name, extra) {
                *best = Some(Found { rule, rank, remainder_start: start });
            }
        };
        if current.flags & (NODE_HAS_SUBTREE | NODE_HAS_GLOB) != 0 {
            // Past the exact rules at the list's head, the `node\**` and glob rules in rank order.
            let below = name.get(start..).unwrap_or_default();
            let case_sensitive = filter.case_sensitive;
            consider(current.rules, &|r| match r.class {
                PatternClass::Subtree => true,
                PatternClass::Glob => pattern::components_match(self.source_rest(r), below, case_sensitive),
                PatternClass::Exact | PatternClass::SubtreeSuffix => false,
            });
        }
        if current.flags & NODE_HAS_SUFFIXES != 0
            && let Some(extension) = parsed.extension
            && let Some(key) = self.child(node, NODE_SUFFIX_KEY, extension)
            && let Some(key_node) = self.nodes.get(key as usize)
        {
            let final_component = parsed.final_component;
            consider(key_node.rules, &|r| self.suffix_matches(r, final_component, filter.case_sensitive));
        }
    }

    /// Matches a path against the policy and returns the most specific matching rule.
    ///
    /// - `volume`: the volume the path is on ([`Volume::Guid`] in the driver).
    /// - `path`: the full path within the volume, with a leading `\` (`\Apps\Legacy\config\a.ini`), long names
    ///   (the normalized name, not an 8.3 alias: see [`could_match`](Self::could_match)), optionally with a stream
    ///   suffix on the last component.
    /// - `process_image`: the opening process's image as a full path in the policy's volume form
    ///   (`\\?\Volume{GUID}\Apps\legacy.exe`), or just its file name (`legacy.exe`), or `None` if unknown. A name
    ///   truncated to 15 characters (`PsGetProcessImageFileName`) does not match longer names. Rules without a
    ///   process condition match every process, including an unknown one.
    /// - `case_sensitive`: the create carried `SL_CASE_SENSITIVE`; a rule's literal parts then compare exactly.
    ///
    /// Runs at any IRQL: it allocates nothing, takes no lock and cannot panic.
    ///
    /// # Errors
    /// A [`NameError`] if the volume has rules and the name has a spelling NTFS itself rejects within the part of
    /// the path that some rule's literal prefix reaches (the components the trie walk examines, up to and including
    /// the first one no rule continues with); the caller then fails the create with `STATUS_OBJECT_NAME_INVALID`.
    pub fn match_path<'a, 'p>(
        &'a self,
        volume: &Volume,
        path: &'p [u16],
        process_image: Option<&[u16]>,
        case_sensitive: bool,
    ) -> Result<Option<Match<'a, 'p>>, NameError> {
        let Some(root) = self.source_root(volume) else { return Ok(None) };
        let filter = Filter { process: ProcessFilter::Image(process_image), case_sensitive };
        // The fast walk answers most names ("no rule") alone; a name it finds a rule for (or rejects) is walked
        // again comparing every component, which settles a hash it took for a key's.
        if matches!(self.walk::<false, false>(root, path, filter), Ok(Walk { found: None, .. })) {
            return Ok(None);
        }
        let Some(found) = self.walk::<false, true>(root, path, filter)?.found else { return Ok(None) };
        // A rare outcome: split the stream off only now.
        let parsed = Self::parse(path)?;
        let Some(rule) = self.rule(found.rule as usize) else { return Ok(None) };
        let remainder = parsed.name.get(found.remainder_start..).unwrap_or_default();
        Ok(Some(Match { rule, remainder_start: found.remainder_start, remainder, stream: parsed.stream }))
    }

    /// Whether an opened name could match a rule, for any process and however its short names expand: `false`
    /// means the open can be passed through without a name query.
    ///
    /// `path` is the opened name within the volume, as given (it may contain 8.3 aliases, which are recognised by
    /// a `~`, and any case). When this returns `true` the driver gets the normalized name
    /// (`FltGetFileNameInformation` with `FLT_FILE_NAME_NORMALIZED`, which expands short names) and calls
    /// [`match_path`](Self::match_path) with it. Same cost class as a match; no allocation, no lock, no panic.
    #[must_use]
    pub fn could_match(&self, volume: &Volume, path: &[u16]) -> bool {
        let Some(root) = self.source_root(volume) else { return false };
        // The walk's `tilde` covers every component of the name (the ones it examined and, where it left early,
        // the rest), the last one included.
        let filter = Filter { process: ProcessFilter::Any, case_sensitive: false };
        let answer = |walk: Result<Walk, NameError>| match walk {
            Err(_) => true,
            Ok(walk) => walk.tilde || walk.found.is_some(),
        };
        // As in `match_path`: the fast walk's "no" stands, its "yes" is checked.
        answer(self.walk::<true, false>(root, path, filter)) && answer(self.walk::<true, true>(root, path, filter))
    }

    /// Whether the policy has any rule whose source is on `volume` (a volume without rules needs no name queries).
    /// A binary search over the policy's volumes.
    #[must_use]
    pub fn has_volume(&self, volume: &Volume) -> bool {
        self.source_root(volume).is_some()
    }

    /// The number of rules.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule at `index` (file order).
    #[must_use]
    pub fn rule(&self, index: usize) -> Option<Rule<'_>> {
        self.rules.get(index).map(|rule| Rule { policy: self, compiled: rule, index })
    }

    /// The rules in file order.
    #[must_use]
    pub fn rules(&self) -> impl ExactSizeIterator<Item = Rule<'_>> + Clone + '_ {
        self.rules.iter().enumerate().map(|(index, rule)| Rule { policy: self, compiled: rule, index })
    }

    /// The volumes the policy names, sorted.
    #[must_use]
    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
    }

    /// The memory this policy holds.
    #[must_use]
    pub fn footprint(&self) -> Footprint {
        use core::mem::size_of;
        Footprint {
            strings: self.arena.capacity().saturating_mul(size_of::<u16>()),
            structure: self
                .rules
                .capacity()
                .saturating_mul(size_of::<CompiledRule>())
                .saturating_add(self.nodes.capacity().saturating_mul(size_of::<Node>()))
                .saturating_add(self.slots.capacity().saturating_mul(size_of::<u32>()))
                .saturating_add(self.filter.capacity().saturating_mul(size_of::<u64>()))
                .saturating_add(self.volumes.capacity().saturating_mul(size_of::<Volume>())),
        }
    }

    /// Copies the rules back into specs (for listing, re-encoding and adding or removing one rule).
    ///
    /// # Errors
    /// Out of memory.
    pub fn to_specs(&self) -> Result<Vec<RuleSpec>, TryReserveError> {
        let mut specs = Vec::new();
        specs.try_reserve_exact(self.rules.len())?;
        for rule in self.rules() {
            specs.push(rule.to_spec()?);
        }
        Ok(specs)
    }
}

fn copy_units(units: &[u16]) -> Result<Vec<u16>, TryReserveError> {
    let mut out = Vec::new();
    out.try_reserve_exact(units.len())?;
    out.extend_from_slice(units);
    Ok(out)
}

impl<'a> Rule<'a> {
    /// The rule's position in the policy (file order).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The rule's name.
    #[must_use]
    pub fn name(&self) -> &'a [u16] {
        self.policy.text(self.compiled.name())
    }

    /// The source pattern as written.
    #[must_use]
    pub fn source(&self) -> &'a [u16] {
        self.policy.text(self.compiled.source())
    }

    /// The target as written.
    #[must_use]
    pub fn target(&self) -> &'a [u16] {
        self.policy.text(self.compiled.target())
    }

    /// The process condition as written.
    #[must_use]
    pub fn process(&self) -> Option<&'a [u16]> {
        (self.compiled.process_kind != ProcessKind::Any).then(|| self.policy.text(self.compiled.process()))
    }

    /// Forward or reparse.
    #[must_use]
    pub fn method(&self) -> Method {
        self.compiled.method
    }

    /// Read-only or read-write.
    #[must_use]
    pub fn access(&self) -> Access {
        self.compiled.access
    }

    /// How the source is matched.
    #[must_use]
    pub fn class(&self) -> PatternClass {
        self.compiled.class
    }

    /// The specificity rank: 0 is the rule that wins over every other.
    #[must_use]
    pub fn rank(&self) -> u32 {
        self.compiled.rank
    }

    /// The source's volume.
    #[must_use]
    pub fn source_volume(&self) -> Volume {
        self.policy.volumes.get(usize::from(self.compiled.source_volume)).copied().unwrap_or(Volume::Letter(b'?'))
    }

    /// The target's volume.
    #[must_use]
    pub fn target_volume(&self) -> Volume {
        self.policy.volumes.get(usize::from(self.compiled.target_volume)).copied().unwrap_or(Volume::Letter(b'?'))
    }

    /// The source's literal prefix within its volume (`\Apps\Legacy\config` for `C:\Apps\Legacy\config\**`).
    #[must_use]
    pub fn literal_prefix(&self) -> &'a [u16] {
        let source = self.source();
        let prefix =
            source.get(usize::from(self.compiled.source_path)..usize::from(self.compiled.rest)).unwrap_or_default();
        prefix.strip_suffix(&[SEPARATOR]).unwrap_or(prefix)
    }

    /// The target's path within its volume, with a leading `\`.
    #[must_use]
    pub fn target_path(&self) -> &'a [u16] {
        self.target().get(usize::from(self.compiled.target_path)..).unwrap_or_default()
    }

    /// Copies the rule into a spec.
    ///
    /// # Errors
    /// Out of memory.
    pub fn to_spec(&self) -> Result<RuleSpec, TryReserveError> {
        Ok(RuleSpec {
            name: copy_units(self.name())?,
            source: copy_units(self.source())?,
            target: copy_units(self.target())?,
            method: self.method(),
            access: self.access(),
            process: self.process().map(copy_units).transpose()?,
        })
    }
}

impl fmt::Debug for Rule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule").field("index", &self.index).field("class", &self.compiled.class).finish_non_exhaustive()
    }
}

impl<'a, 'p> Match<'a, 'p> {
    /// The rule that matched.
    #[must_use]
    pub fn rule(&self) -> Rule<'a> {
        self.rule
    }

    /// The part of the caller's path below the rule's literal prefix, in the caller's spelling (empty for an exact
    /// rule). It is appended to the target directory.
    #[must_use]
    pub fn remainder(&self) -> &'p [u16] {
        self.remainder
    }

    /// Where [`remainder`](Self::remainder) starts in the matched path (the name's end for an exact rule).
    #[must_use]
    pub fn remainder_start(&self) -> usize {
        self.remainder_start
    }

    /// The named stream the caller opened (`:name` or `:name:$DATA`), empty for the file itself (including
    /// `::$DATA`). Forward rules refuse named streams; reparse rules open the same stream of the backing file.
    #[must_use]
    pub fn stream(&self) -> &'p [u16] {
        self.stream
    }

    /// The backing file's volume.
    #[must_use]
    pub fn backing_volume(&self) -> Volume {
        self.rule.target_volume()
    }

    /// The length in units of [`write_backing_path`](Self::write_backing_path)'s result.
    #[must_use]
    pub fn backing_path_len(&self) -> usize {
        let separator = usize::from(!self.remainder.is_empty());
        self.rule
            .target_path()
            .len()
            .saturating_add(separator)
            .saturating_add(self.remainder.len())
            .saturating_add(self.stream.len())
    }

    /// Writes the backing path within the backing volume (target, `\`, remainder, stream) into `out` and returns
    /// its length, or `None` if `out` is shorter than [`backing_path_len`](Self::backing_path_len).
    pub fn write_backing_path(&self, out: &mut [u16]) -> Option<usize> {
        let length = self.backing_path_len();
        let out = out.get_mut(..length)?;
        let target = self.rule.target_path();
        let (head, tail) = out.split_at_mut_checked(target.len())?;
        head.copy_from_slice(target);
        let tail = if self.remainder.is_empty() {
            tail
        } else {
            let (separator, tail) = tail.split_first_mut()?;
            *separator = SEPARATOR;
            let (middle, tail) = tail.split_at_mut_checked(self.remainder.len())?;
            middle.copy_from_slice(self.remainder);
            tail
        };
        tail.copy_from_slice(self.stream);
        Some(length)
    }

    /// The backing path within the backing volume, allocated.
    ///
    /// # Errors
    /// Out of memory.
    pub fn backing_path(&self) -> Result<Vec<u16>, TryReserveError> {
        let mut out = Vec::new();
        out.try_reserve_exact(self.backing_path_len())?;
        out.resize(self.backing_path_len(), 0);
        let _ = self.write_backing_path(&mut out);
        Ok(out)
    }
}

impl fmt::Debug for Match<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Match").field("rule", &self.rule.index).field("remainder_len", &self.remainder.len()).finish()
    }
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
    use std::{format, string::String, vec, vec::Vec};

    use super::*;
    use crate::reference;

    fn w(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    fn spec(name: &str, source: &str, target: &str) -> RuleSpec {
        RuleSpec {
            name: w(name),
            source: w(source),
            target: w(target),
            method: Method::Forward,
            access: Access::ReadOnly,
            process: None,
        }
    }

    fn with_process(mut rule: RuleSpec, process: &str) -> RuleSpec {
        rule.process = Some(w(process));
        rule
    }

    fn compile(rules: &[RuleSpec]) -> CompiledPolicy {
        CompiledPolicy::new(rules, VolumeNames::AllowDriveLetters).unwrap()
    }

    const C: Volume = Volume::Letter(b'C');

    /// The winning rule's name and the backing path, checked against the reference matcher.
    fn hit(
        policy: &CompiledPolicy,
        path: &str,
        process: Option<&str>,
        case_sensitive: bool,
    ) -> Option<(String, String)> {
        let path = w(path);
        let process = process.map(w);
        let found = policy.match_path(&C, &path, process.as_deref(), case_sensitive).unwrap();
        let expected = reference::match_linear(policy, &C, &path, process.as_deref(), case_sensitive).unwrap();
        assert_eq!(found.as_ref().map(reference::found_of), expected, "compiled and reference disagree");
        found.map(|m| {
            let backing = m.backing_path().unwrap();
            (String::from_utf16(m.rule().name()).unwrap(), String::from_utf16(&backing).unwrap())
        })
    }

    fn name_of(policy: &CompiledPolicy, path: &str) -> Option<String> {
        hit(policy, path, None, false).map(|(name, _)| name)
    }

    #[test]
    fn exact_subtree_and_suffix_rules() {
        let policy = compile(&[
            spec("file", r"C:\Apps\Legacy\settings.ini", r"D:\Overlay\settings.ini"),
            spec("tree", r"C:\Apps\Legacy\config\**", r"D:\Overlay\Legacy\config"),
            spec("logs", r"C:\Logs\**\*.log", r"D:\Logs"),
        ]);
        assert_eq!(
            hit(&policy, r"\apps\LEGACY\Settings.INI", None, false),
            Some(("file".into(), r"\Overlay\settings.ini".into()))
        );
        assert_eq!(
            hit(&policy, r"\Apps\Legacy\Config\Sub\A.ini", None, false),
            Some(("tree".into(), r"\Overlay\Legacy\config\Sub\A.ini".into())),
            "the remainder keeps the caller's spelling"
        );
        assert_eq!(name_of(&policy, r"\Apps\Legacy\config"), None, "dir\\** is below dir, not dir itself");
        assert_eq!(hit(&policy, r"\Logs\a\b\x.LOG", None, false), Some(("logs".into(), r"\Logs\a\b\x.LOG".into())));
        assert_eq!(name_of(&policy, r"\Logs\x.log"), Some("logs".into()), "** may match no directory");
        assert_eq!(name_of(&policy, r"\Logs\x.txt"), None);
        assert_eq!(name_of(&policy, r"\Logs.log"), None);
        assert!(policy.match_path(&Volume::Letter(b'E'), &w(r"\Logs\x.log"), None, false).unwrap().is_none());
    }

    #[test]
    fn prefixes_match_only_on_component_boundaries() {
        let policy = compile(&[spec("leg", r"C:\Apps\Leg\**", r"D:\x"), spec("exact", r"C:\Apps\Leg", r"D:\y")]);
        assert_eq!(name_of(&policy, r"\Apps\Legacy\x"), None);
        assert_eq!(name_of(&policy, r"\Apps\Leg\x"), Some("leg".into()));
        assert_eq!(name_of(&policy, r"\Apps\Legx"), None);
        assert_eq!(name_of(&policy, r"\Apps\Le"), None);
    }

    #[test]
    fn names_compare_like_ntfs() {
        let policy =
            compile(&[spec("umlaut", r"C:\Daten\Äpfel.txt", r"D:\a"), spec("eszett", r"C:\Straße\**", r"D:\b")]);
        assert_eq!(name_of(&policy, r"\DATEN\äpfel.TXT"), Some("umlaut".into()));
        assert_eq!(name_of(&policy, r"\STRAßE\x"), Some("eszett".into()));
        assert_eq!(name_of(&policy, r"\STRASSE\x"), None, "ß is not SS");
        assert_eq!(hit(&policy, r"\Daten\äpfel.txt", None, true), None, "case-sensitive creates compare exactly");
        assert_eq!(hit(&policy, r"\Daten\Äpfel.txt", None, true).map(|h| h.0), Some("umlaut".into()));
    }

    #[test]
    fn case_sensitive_creates_pick_the_rule_spelled_like_the_path() {
        let policy = compile(&[
            spec("upper", r"C:\Data\**\*.LOG", r"D:\u"),
            spec("lower", r"C:\data\**\*.log", r"D:\l"),
            spec("glob", r"C:\Data\x?\*.TXT", r"D:\g"),
        ]);
        assert_eq!(hit(&policy, r"\data\a.log", None, true).map(|h| h.0), Some("lower".into()));
        assert_eq!(hit(&policy, r"\Data\a.LOG", None, true).map(|h| h.0), Some("upper".into()));
        assert_eq!(hit(&policy, r"\Data\a.Log", None, true), None);
        assert_eq!(hit(&policy, r"\data\a.LOG", None, false).map(|h| h.0), Some("upper".into()), "file order");
        assert_eq!(hit(&policy, r"\Data\xy\A.TXT", None, true).map(|h| h.0), Some("glob".into()));
        assert_eq!(hit(&policy, r"\Data\xy\A.txt", None, true), None);
    }

    #[test]
    fn streams_dots_and_separators() {
        let policy = compile(&[spec("file", r"C:\Apps\a.ini", r"D:\b.ini"), spec("tree", r"C:\Tree\**", r"D:\T")]);
        assert_eq!(name_of(&policy, r"\Apps\a.ini::$DATA"), Some("file".into()));
        assert_eq!(name_of(&policy, r"\Apps\a.ini::$data"), Some("file".into()));
        let path = w(r"\Apps\a.ini:extra:$DATA");
        let found = policy.match_path(&C, &path, None, false).unwrap().unwrap();
        assert_eq!(found.stream(), &w(":extra:$DATA")[..]);
        assert_eq!(String::from_utf16(&found.backing_path().unwrap()).unwrap(), r"\b.ini:extra:$DATA");
        assert_eq!(name_of(&policy, r"\\Apps\\\a.ini"), Some("file".into()), "repeated separators collapse");
        assert_eq!(name_of(&policy, r"\Apps\a.ini\"), Some("file".into()));
        assert_eq!(name_of(&policy, r"\Apps\a.ini."), None, "a trailing dot names another NTFS file");
        assert_eq!(name_of(&policy, r"\Apps\a.ini "), None);
        for bad in [r"\Apps\..\Tree\x", r"\Apps\.\a.ini", r"\Tree\..\Apps\a.ini", r"\..\Apps\a.ini"] {
            assert_eq!(policy.match_path(&C, &w(bad), None, false).unwrap_err(), NameError::DotComponent, "{bad}");
            assert!(policy.could_match(&C, &w(bad)));
        }
        // Past the last component any rule reaches, the name is not examined: NTFS fails it by itself.
        assert!(policy.match_path(&C, &w(r"\Apps\x\..\a.ini"), None, false).unwrap().is_none());
        assert!(policy.match_path(&C, &w(r"\Other\x:s\..\y"), None, false).unwrap().is_none());
        let dir_stream = w(r"\Tree:$I30:$INDEX_ALLOCATION\x");
        assert_eq!(policy.match_path(&C, &dir_stream, None, false).unwrap_err(), NameError::StreamOnDirectory);
        assert_eq!(policy.match_path(&C, &w(r"\Tree\:s"), None, false).unwrap_err(), NameError::StreamWithoutName);
        // A volume without rules never refuses a name.
        assert!(policy.match_path(&Volume::Letter(b'Q'), &w(r"\..\x"), None, false).unwrap().is_none());
    }

    #[test]
    fn most_specific_rule_wins() {
        let policy = compile(&[
            spec("wide", r"C:\A\**", r"D:\1"),
            spec("deeper", r"C:\A\B\**", r"D:\2"),
            spec("ext", r"C:\A\B\**\*.txt", r"D:\3"),
            spec("glob", r"C:\A\B\C\*.txt", r"D:\4"),
            spec("exact", r"C:\A\B\C\x.txt", r"D:\5"),
            spec("same-as-deeper", r"C:\A\B\**", r"D:\6"),
        ]);
        assert_eq!(name_of(&policy, r"\A\B\C\x.txt"), Some("exact".into()));
        assert_eq!(name_of(&policy, r"\A\B\C\y.txt"), Some("glob".into()), "longer literal prefix");
        assert_eq!(name_of(&policy, r"\A\B\y.txt"), Some("deeper".into()), "fewer wildcards, then file order");
        assert_eq!(name_of(&policy, r"\A\y.txt"), Some("wide".into()));
        let ranks: Vec<u32> = policy.rules().map(|r| r.rank()).collect();
        assert_eq!(ranks, [5, 2, 4, 1, 0, 3]);
    }

    #[test]
    fn process_conditions() {
        let policy = compile(&[
            with_process(spec("by-name", r"C:\P\a.ini", r"D:\1"), "legacy.exe"),
            with_process(spec("by-path", r"C:\P\b.ini", r"D:\2"), r"C:\Apps\Tool.exe"),
            spec("anyone", r"C:\P\**", r"D:\3"),
        ]);
        assert_eq!(hit(&policy, r"\P\a.ini", Some(r"C:\Apps\LEGACY.EXE"), false).map(|h| h.0), Some("by-name".into()));
        assert_eq!(hit(&policy, r"\P\a.ini", Some("legacy.exe"), false).map(|h| h.0), Some("by-name".into()));
        assert_eq!(hit(&policy, r"\P\a.ini", Some("legacy.ex"), false).map(|h| h.0), Some("anyone".into()));
        assert_eq!(hit(&policy, r"\P\a.ini", None, false).map(|h| h.0), Some("anyone".into()));
        assert_eq!(hit(&policy, r"\P\b.ini", Some(r"c:\apps\tool.exe"), false).map(|h| h.0), Some("by-path".into()));
        assert_eq!(hit(&policy, r"\P\b.ini", Some(r"E:\apps\tool.exe"), false).map(|h| h.0), Some("anyone".into()));
        assert_eq!(hit(&policy, r"\P\b.ini", Some("tool.exe"), false).map(|h| h.0), Some("anyone".into()));
    }

    #[test]
    fn could_match_is_a_cheap_superset() {
        let policy = compile(&[
            with_process(spec("p", r"C:\Apps\Legacy\a.ini", r"D:\1"), "x.exe"),
            spec("t", r"C:\Data\**", r"D:\2"),
        ]);
        assert!(policy.could_match(&C, &w(r"\apps\legacy\A.INI")), "any process");
        assert!(policy.could_match(&C, &w(r"\Data\x")));
        assert!(!policy.could_match(&C, &w(r"\Other\x")));
        assert!(!policy.could_match(&C, &w(r"\Data")));
        assert!(policy.could_match(&C, &w(r"\APPS~1\LEGACY~1\a.ini")), "8.3 aliases need the normalized name");
        assert!(!policy.could_match(&Volume::Letter(b'D'), &w(r"\APPS~1\x")));
        assert!(policy.has_volume(&C));
        assert!(!policy.has_volume(&Volume::Letter(b'D')));
    }

    /// Two different components with the same 32-bit key hash below `parent`, found by the birthday bound among
    /// eight-letter names (about 2^17 of them give an even chance; 2^19 make it certain in practice).
    fn colliding_names(parent: u32) -> (String, String) {
        let name = |mut n: u32| -> String {
            (0..8)
                .map(|_| {
                    let letter = char::from(b'A' + (n % 26) as u8);
                    n /= 26;
                    letter
                })
                .collect()
        };
        let mut seen: Vec<(u32, u32)> = (0..1u32 << 19).map(|n| (hash_key(parent, 0, &w(&name(n))), n)).collect();
        seen.sort_unstable();
        let pair = seen.windows(2).find(|p| p[0].0 == p[1].0).expect("a collision among 2^19 hashes");
        (name(pair[0].1), name(pair[1].1))
    }

    /// The fast walk trusts a hash without reading the node; a name that only shares a key's hash is settled by
    /// the verified walk, and keys that share a hash are always compared.
    #[test]
    fn a_component_that_only_shares_a_keys_hash_does_not_match() {
        let probe = compile(&[spec("probe", r"C:\Probe\**", r"D:\p")]);
        let root = probe.source_root(&C).unwrap();
        let (a, b) = colliding_names(root);
        assert_ne!(a, b);
        let one = compile(&[spec("a", &format!(r"C:\{a}\**"), r"D:\a")]);
        assert_eq!(one.source_root(&C), Some(root), "the same root index, so the same hash");
        let path = w(&format!(r"\{b}\file.txt"));
        assert!(one.match_path(&C, &path, None, false).unwrap().is_none(), "{b} only shares {a}'s hash");
        assert!(!one.could_match(&C, &path));
        assert!(one.match_path(&C, &w(&format!(r"\{a}\file.txt")), None, false).unwrap().is_some());
        let both = compile(&[spec("a", &format!(r"C:\{a}\**"), r"D:\a"), spec("b", &format!(r"C:\{b}\**"), r"D:\b")]);
        let found = both.match_path(&C, &path, None, false).unwrap().unwrap();
        assert_eq!(found.rule.name(), w("b").as_slice(), "keys sharing a hash are compared, never confused");
        assert!(both.slots.iter().filter(|&&e| e != NIL && e & both.verify_bit != 0).count() >= 2);
    }

    fn reject(rules: &[RuleSpec], volumes: VolumeNames) -> PolicyError {
        CompiledPolicy::new(rules, volumes).unwrap_err()
    }

    fn problem(source: &str, target: &str) -> (Option<Field>, Problem) {
        let error = reject(&[spec("r", source, target)], VolumeNames::AllowDriveLetters);
        (error.field, error.problem)
    }

    #[test]
    fn validation_names_the_rule_and_field() {
        use Problem as P;
        assert_eq!(problem("", r"D:\x"), (Some(Field::Source), P::Empty));
        assert_eq!(problem(r"Apps\x", r"D:\x"), (Some(Field::Source), P::NotAbsolute));
        assert_eq!(problem(r"C:\a", r"x"), (Some(Field::Target), P::NotAbsolute));
        assert_eq!(problem(r"C:\", r"D:\x"), (Some(Field::Source), P::VolumeRoot));
        assert_eq!(problem(r"C:\a\\b", r"D:\x"), (Some(Field::Source), P::EmptyComponent));
        assert_eq!(problem(r"C:\a\", r"D:\x"), (Some(Field::Source), P::EmptyComponent));
        assert_eq!(problem(r"C:\a\..\b", r"D:\x"), (Some(Field::Source), P::DotComponent));
        assert_eq!(problem(r"C:\a.", r"D:\x"), (Some(Field::Source), P::TrailingDotOrSpace));
        assert_eq!(problem(r"C:\a:s", r"D:\x"), (Some(Field::Source), P::Stream));
        assert_eq!(problem(r"C:\a|b", r"D:\x"), (Some(Field::Source), P::InvalidCharacter(0x7C)));
        assert_eq!(problem(r"C:\a/b", r"D:\x"), (Some(Field::Source), P::InvalidCharacter(0x2F)));
        assert_eq!(problem(r"C:\a**\b", r"D:\x"), (Some(Field::Source), P::MisplacedGlobstar));
        assert_eq!(problem(r"C:\a\**", r"D:\x\*"), (Some(Field::Target), P::Wildcard));
        let long = std::format!(r"C:\{}", "a".repeat(MAX_PATH_UNITS));
        assert_eq!(problem(&long, r"D:\x"), (Some(Field::Source), P::TooLong));
        let mut bad_utf16 = spec("r", r"C:\a", r"D:\x");
        bad_utf16.source.push(0xD800);
        assert_eq!(reject(&[bad_utf16], VolumeNames::AllowDriveLetters).problem, P::InvalidUtf16);
        let error = reject(&[spec("r", r"C:\a", r"D:\x")], VolumeNames::GuidsOnly);
        assert_eq!((error.field, error.problem), (Some(Field::Source), P::DriveLetter));
        let error = reject(&[with_process(spec("r", r"C:\a", r"D:\x"), "*.exe")], VolumeNames::AllowDriveLetters);
        assert_eq!((error.field, error.problem), (Some(Field::Process), P::Wildcard));
        let mut unnamed = spec("", r"C:\a", r"D:\x");
        unnamed.name.clear();
        assert_eq!(reject(&[unnamed], VolumeNames::AllowDriveLetters).field, Some(Field::Name));
    }

    #[test]
    fn duplicate_names_and_rule_counts() {
        let rules = [spec("a", r"C:\1", r"D:\1"), spec("b", r"C:\2", r"D:\2"), spec("a", r"C:\3", r"D:\3")];
        let error = reject(&rules, VolumeNames::AllowDriveLetters);
        assert_eq!(error, PolicyError::at(2, Field::Name, Problem::DuplicateName(0)));
        assert_eq!(std::format!("{}", error.describe(&rules)), r#"rule "a": name: is already the name of rule "a""#);
        let many: Vec<RuleSpec> =
            (0..=MAX_RULES).map(|i| spec(&std::format!("r{i}"), &std::format!(r"C:\{i}"), r"D:\x")).collect();
        assert_eq!(reject(&many, VolumeNames::AllowDriveLetters).problem, Problem::TooManyRules);
    }

    #[test]
    fn targets_inside_sources_are_cycles() {
        let cycle = |rules: &[RuleSpec]| reject(rules, VolumeNames::AllowDriveLetters);
        let self_cycle = cycle(&[spec("self", r"C:\Apps\**", r"C:\Apps\Overlay")]);
        assert_eq!(self_cycle, PolicyError::at(0, Field::Target, Problem::TargetInsideSource(0)));
        assert_eq!(
            std::format!("{}", self_cycle.describe(&[spec("self", r"C:\Apps\**", r"C:\Apps\Overlay")])),
            r#"rule "self": target: lies inside this rule's own source (a redirect cycle)"#
        );
        let into_other = [spec("a", r"C:\A\x.ini", r"D:\B\x.ini"), spec("b", r"D:\B\**", r"E:\y")];
        assert_eq!(cycle(&into_other), PolicyError::at(0, Field::Target, Problem::TargetInsideSource(1)));
        // A directory target with a source below it.
        let below = [spec("a", r"C:\A\**", r"D:\B"), spec("b", r"D:\B\C\f.txt", r"E:\f.txt")];
        assert_eq!(cycle(&below).problem, Problem::TargetInsideSource(1));
        let glob = [spec("a", r"C:\A\**", r"D:\B\q"), spec("b", r"D:\B\*\*.txt", r"E:\f")];
        assert_eq!(cycle(&glob).problem, Problem::TargetInsideSource(1));
        let suffix = [spec("a", r"C:\A\**", r"D:\B\q"), spec("b", r"D:\B\**\*.txt", r"E:\f")];
        assert_eq!(cycle(&suffix).problem, Problem::TargetInsideSource(1));
        let suffix_file = [spec("a", r"C:\A\x.txt", r"D:\B\q.txt"), spec("b", r"D:\B\**\*.txt", r"E:\f")];
        assert_eq!(cycle(&suffix_file).problem, Problem::TargetInsideSource(1));
        let exact_equal = [spec("a", r"C:\A\x", r"C:\A\x")];
        assert_eq!(cycle(&exact_equal).problem, Problem::TargetInsideSource(0));
        // Neighbours are fine: a file target beside a suffix rule's extension, a sibling directory.
        compile(&[spec("a", r"C:\A\x.ini", r"D:\B\q.ini"), spec("b", r"D:\B\**\*.txt", r"E:\f")]);
        compile(&[spec("a", r"C:\A\**", r"C:\Ab"), spec("b", r"C:\B\*.txt", r"C:\A2")]);
    }

    #[test]
    fn backing_paths_are_written_without_allocation() {
        let policy = compile(&[spec("t", r"C:\Src\**", r"D:\Dst")]);
        let path = w(r"\src\Sub\File.txt");
        let found = policy.match_path(&C, &path, None, false).unwrap().unwrap();
        assert_eq!(found.remainder(), &w(r"Sub\File.txt")[..]);
        assert_eq!(found.backing_volume(), Volume::Letter(b'D'));
        let mut short = [0u16; 8];
        assert_eq!(found.write_backing_path(&mut short), None);
        let mut out = vec![0u16; 64];
        let length = found.write_backing_path(&mut out).unwrap();
        assert_eq!(&out[..length], &w(r"\Dst\Sub\File.txt")[..]);
    }

    #[test]
    fn large_policies_filter_lookups_without_losing_keys() {
        let rules: Vec<RuleSpec> = (0..3000)
            .map(|i| {
                let source = if i % 2 == 0 {
                    std::format!(r"C:\Data\D{}\F{i}\x.ini", i % 50)
                } else {
                    std::format!(r"C:\Data\D{}\T{i}\**", i % 50)
                };
                spec(&std::format!("r{i}"), &source, &std::format!(r"D:\O\{i}"))
            })
            .collect();
        let policy = compile(&rules);
        assert!(policy.nodes.len() >= FILTER_MIN_NODES && !policy.filter.is_empty());
        // The reference matcher scans every rule, so check a sample.
        for i in (0..3000).step_by(37) {
            let present = if i % 2 == 0 {
                std::format!(r"\data\d{}\f{i}\X.INI", i % 50)
            } else {
                std::format!(r"\DATA\D{}\t{i}\sub\y", i % 50)
            };
            assert_eq!(name_of(&policy, &present), Some(std::format!("r{i}")), "{present}");
            assert_eq!(name_of(&policy, &std::format!(r"\Data\D{}\G{i}\x.ini", i % 50)), None);
            assert!(policy.could_match(&C, &w(&present)));
        }
    }

    #[test]
    fn footprint_counts_strings_apart() {
        let rules: Vec<RuleSpec> = (0..1000)
            .map(|i| {
                spec(&std::format!("r{i}"), &std::format!(r"C:\Apps\D{}\F{i}.ini", i % 50), &std::format!(r"D:\O\{i}"))
            })
            .collect();
        let policy = compile(&rules);
        let units: usize = rules.iter().map(|r| r.name.len() + r.source.len() + r.target.len()).sum();
        let footprint = policy.footprint();
        assert_eq!(footprint.strings, units * 2);
        assert!(footprint.structure / rules.len() <= 150, "{} bytes per rule", footprint.structure / rules.len());
    }
}
