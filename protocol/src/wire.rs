//! The communication-port wire format, and the policy encoding the driver also persists on disk.
//!
//! # Layout
//!
//! Everything is little-endian and every structure has alignment 1 ([`zerocopy`]'s byte-order types), so a message
//! can be decoded from any buffer without copying or casting. A message is a [`Header`] followed by a payload:
//!
//! | Type | Request payload | Reply payload (after [`ReplyPrefix`], only when the status is a success) |
//! |---|---|---|
//! | `Status` (1) | none | `StatusBody`, then `volume_count` volume GUIDs (16 bytes each) |
//! | `SetPolicy` (2) | a policy blob (below): the whole policy, replaced atomically | the new policy generation (u64) |
//! | `AddRule` (3) | one rule record | the new policy generation |
//! | `RemoveRule` (4) | `name_bytes` (u16), reserved (u16), the name | the new policy generation |
//! | `ListRules` (5) | `start_index` (u32), `max_reply_bytes` (u32) | `ListRulesBody`, then `returned` rule records |
//! | `ClearPolicy` (6) | none | the new policy generation |
//! | `GetStats` (7) | none | [`Stats`]: eight u64 counters |
//!
//! A reply has the request's type with bit 15 set and the request's id. `ListRules` pages: the driver returns the
//! rules from `start_index` on that fit in `max_reply_bytes`, with the total and the policy generation, and the
//! client asks again from `first_index + returned` until it has `total_rules`, starting over if the generation
//! changed in between.
//!
//! A **policy blob** is a `PolicyHeader` (magic `SHPL`, version, total length, rule count, CRC-32 of the blob with
//! the checksum field zero) followed by `rule_count` rule records. The driver persists exactly this blob.
//!
//! A **rule record** is a `RuleHeader` (record length, method, access, flags, then the byte lengths of the name,
//! source, target and process strings) followed by those UTF-16LE strings, back to back. There are no offsets, so
//! strings cannot overlap or point outside their record.
//!
//! # Decoding
//!
//! [`decode_request`], [`decode_reply`] and [`decode_policy`] check everything once — magic, version, type, every
//! length against the buffer and against each other, counts against what the remaining bytes can hold before
//! anything is allocated, even UTF-16 byte lengths, enumerations, reserved fields zero, no trailing bytes, sizes
//! bounded by [`MAX_MESSAGE_BYTES`], [`MAX_RULES`] and the string limits — and never panic. They allocate only
//! fallibly. What the rules *mean* is checked afterwards by [`CompiledPolicy::new`](crate::CompiledPolicy::new).

use alloc::vec::Vec;
use core::{fmt, mem::size_of};

use zerocopy::{
    FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned,
    little_endian::{I32, U16, U32, U64},
};

use crate::{
    CompiledPolicy, Guid, PROTOCOL_VERSION,
    policy::{Access, MAX_NAME_UNITS, MAX_PATH_UNITS, MAX_RULES, Method, RuleSpec},
};

/// `SHNT`: the first four bytes of every message.
pub const MESSAGE_MAGIC: u32 = u32::from_le_bytes(*b"SHNT");
/// `SHPL`: the first four bytes of a policy blob.
pub const POLICY_MAGIC: u32 = u32::from_le_bytes(*b"SHPL");
/// The version of the policy blob format.
pub const POLICY_VERSION: u16 = 1;
/// The largest message or policy blob accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The bit that marks a reply's message type.
pub const REPLY_BIT: u16 = 0x8000;

const HAS_PROCESS: u8 = 1;
const MAX_PATH_BYTES: usize = MAX_PATH_UNITS * 2;
const MAX_NAME_BYTES: usize = MAX_NAME_UNITS * 2;

/// The fixed header of every message.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    /// [`MESSAGE_MAGIC`].
    pub magic: U32,
    /// [`PROTOCOL_VERSION`].
    pub version: U16,
    /// A [`MessageType`], with [`REPLY_BIT`] set in replies.
    pub message_type: U16,
    /// The length of the whole message, header included, in bytes.
    pub total_length: U32,
    /// Zero.
    pub reserved: U32,
    /// Chosen by the client, echoed in the reply.
    pub request_id: U64,
}

/// What every reply starts with after the header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyPrefix {
    /// The NTSTATUS of the request. A body follows only when it is a success (not negative).
    pub status: I32,
    /// Zero.
    pub reserved: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PolicyHeader {
    magic: U32,
    version: U16,
    reserved: U16,
    total_length: U32,
    rule_count: U32,
    checksum: U32,
    reserved2: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RuleHeader {
    record_length: U32,
    method: u8,
    access: u8,
    flags: u8,
    reserved: u8,
    name_bytes: U16,
    source_bytes: U16,
    target_bytes: U16,
    process_bytes: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct StatusBody {
    driver_version: U32,
    protocol_version: U16,
    reserved: U16,
    policy_generation: U64,
    rule_count: U32,
    volume_count: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ListRulesRequest {
    start_index: U32,
    max_reply_bytes: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ListRulesBody {
    total_rules: U32,
    first_index: U32,
    returned: U32,
    reserved: U32,
    policy_generation: U64,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RemoveRuleRequest {
    name_bytes: U16,
    reserved: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct StatsBody {
    counters: [U64; 8],
}

const _: () = assert!(size_of::<Header>() == 24);
const _: () = assert!(size_of::<ReplyPrefix>() == 8);
const _: () = assert!(size_of::<PolicyHeader>() == 24);
const _: () = assert!(size_of::<RuleHeader>() == 16);
const _: () = assert!(size_of::<StatusBody>() == 24);
const _: () = assert!(size_of::<ListRulesBody>() == 24);
const _: () = assert!(size_of::<StatsBody>() == 64);

/// The bytes a `ListRules` reply needs besides its rule records.
pub const LIST_REPLY_OVERHEAD: usize = size_of::<Header>() + size_of::<ReplyPrefix>() + size_of::<ListRulesBody>();

/// Message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum MessageType {
    /// Driver version, policy generation, rule count, attached volumes.
    Status = 1,
    /// Replace the whole policy atomically.
    SetPolicy = 2,
    /// Add one rule.
    AddRule = 3,
    /// Remove one rule by name.
    RemoveRule = 4,
    /// List the rules, a page at a time.
    ListRules = 5,
    /// Remove every rule.
    ClearPolicy = 6,
    /// Read the counters.
    GetStats = 7,
}

impl MessageType {
    fn from_wire(value: u16) -> Option<Self> {
        Some(match value {
            1 => Self::Status,
            2 => Self::SetPolicy,
            3 => Self::AddRule,
            4 => Self::RemoveRule,
            5 => Self::ListRules,
            6 => Self::ClearPolicy,
            7 => Self::GetStats,
            _ => return None,
        })
    }
}

/// A request to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Ask for [`StatusInfo`].
    Status,
    /// Replace the policy with these rules (validated as a whole by the driver).
    SetPolicy(Vec<RuleSpec>),
    /// Add a rule.
    AddRule(RuleSpec),
    /// Remove the rule with this name.
    RemoveRule(Vec<u16>),
    /// List rules from `start_index`, in a reply of at most `max_reply_bytes`.
    ListRules {
        /// The first rule wanted (file order).
        start_index: u32,
        /// The largest reply the client can take.
        max_reply_bytes: u32,
    },
    /// Remove every rule.
    ClearPolicy,
    /// Ask for [`Stats`].
    GetStats,
}

impl Request {
    /// The message type.
    #[must_use]
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Status => MessageType::Status,
            Self::SetPolicy(_) => MessageType::SetPolicy,
            Self::AddRule(_) => MessageType::AddRule,
            Self::RemoveRule(_) => MessageType::RemoveRule,
            Self::ListRules { .. } => MessageType::ListRules,
            Self::ClearPolicy => MessageType::ClearPolicy,
            Self::GetStats => MessageType::GetStats,
        }
    }
}

/// The driver's state, for `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusInfo {
    /// The driver's version (major << 16 | minor).
    pub driver_version: u32,
    /// The protocol version the driver speaks.
    pub protocol_version: u16,
    /// Increases with every policy change.
    pub policy_generation: u64,
    /// The number of rules.
    pub rule_count: u32,
    /// The volumes the driver is attached to.
    pub volumes: Vec<Guid>,
}

/// One page of rules, for `ListRules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePage {
    /// The number of rules in the policy.
    pub total_rules: u32,
    /// The index of the first rule in this page.
    pub first_index: u32,
    /// The generation the page was taken from.
    pub policy_generation: u64,
    /// The rules.
    pub rules: Vec<RuleSpec>,
}

/// The driver's counters, for `GetStats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Creates seen on volumes with rules.
    pub creates_seen: u64,
    /// Creates whose name was queried because it could match.
    pub name_queries: u64,
    /// Creates redirected by forward rules.
    pub forwarded: u64,
    /// Creates redirected by reparse rules.
    pub reparsed: u64,
    /// Operations refused by a rule (write on read-only, sections, streams, ...).
    pub refused: u64,
    /// Operations posted to a worker.
    pub posted: u64,
    /// Operations refused because a top-level IRP was set.
    pub top_level_refused: u64,
    /// Paging I/O that reached a redirected handle.
    pub paging_refused: u64,
}

impl Stats {
    fn to_array(self) -> [u64; 8] {
        [
            self.creates_seen,
            self.name_queries,
            self.forwarded,
            self.reparsed,
            self.refused,
            self.posted,
            self.top_level_refused,
            self.paging_refused,
        ]
    }

    fn from_array(values: [u64; 8]) -> Self {
        let [creates_seen, name_queries, forwarded, reparsed, refused, posted, top_level_refused, paging_refused] =
            values;
        Self { creates_seen, name_queries, forwarded, reparsed, refused, posted, top_level_refused, paging_refused }
    }
}

/// A reply's body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyBody {
    /// The request failed: no body.
    Failed,
    /// For `Status`.
    Status(StatusInfo),
    /// For `SetPolicy`, `AddRule`, `RemoveRule`, `ClearPolicy`: the new policy generation.
    Generation(u64),
    /// For `ListRules`.
    Rules(RulePage),
    /// For `GetStats`.
    Stats(Stats),
}

/// A reply from the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's id.
    pub request_id: u64,
    /// The request's type.
    pub message_type: MessageType,
    /// The NTSTATUS.
    pub status: i32,
    /// The body, [`ReplyBody::Failed`] exactly when `status` is negative.
    pub body: ReplyBody,
}

/// Why bytes were not a valid message or policy blob, or a value could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer ends before the structure or string being read.
    Truncated,
    /// A declared total length differs from the bytes there are (larger or smaller).
    LengthMismatch {
        /// What the header says.
        declared: usize,
        /// What there is.
        actual: usize,
    },
    /// Bytes were left over after the last field.
    TrailingBytes,
    /// The magic is wrong.
    BadMagic,
    /// A version this crate does not speak.
    UnsupportedVersion(u16),
    /// An unknown message type (or a request type in a reply, or the reverse).
    UnknownMessageType(u16),
    /// A reserved field or flag is not zero.
    ReservedNotZero,
    /// A count or size beyond the limits, or more elements than the remaining bytes could hold.
    TooLarge,
    /// A UTF-16 string's byte length is odd.
    OddLength,
    /// A rule record's length differs from its header and strings.
    BadRecordLength,
    /// A method, access or flag value that does not exist.
    InvalidValue,
    /// The policy blob's checksum does not match.
    BadChecksum,
    /// A failed reply with a body, or a successful one without.
    BodyMismatch,
    /// Memory could not be allocated.
    OutOfMemory,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("the message is truncated"),
            Self::LengthMismatch { declared, actual } => {
                write!(f, "the declared length {declared} differs from the {actual} bytes present")
            }
            Self::TrailingBytes => f.write_str("bytes follow the last field"),
            Self::BadMagic => f.write_str("bad magic"),
            Self::UnsupportedVersion(version) => write!(f, "unsupported version {version}"),
            Self::UnknownMessageType(kind) => write!(f, "unknown message type {kind:#06x}"),
            Self::ReservedNotZero => f.write_str("a reserved field is not zero"),
            Self::TooLarge => f.write_str("a count or size exceeds its limit"),
            Self::OddLength => f.write_str("a UTF-16 string has an odd byte length"),
            Self::BadRecordLength => f.write_str("a rule record's length is inconsistent"),
            Self::InvalidValue => f.write_str("an enumeration or flag has an invalid value"),
            Self::BadChecksum => f.write_str("the policy checksum does not match"),
            Self::BodyMismatch => f.write_str("the reply body does not fit its status"),
            Self::OutOfMemory => f.write_str("out of memory"),
        }
    }
}

impl core::error::Error for WireError {}

/// Reads structures and strings off the front of a buffer, refusing to run past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn read<T: FromBytes + KnownLayout + Immutable + Unaligned>(&mut self) -> Result<&'a T, WireError> {
        let (value, rest) = T::ref_from_prefix(self.rest).map_err(|_| WireError::Truncated)?;
        self.rest = rest;
        Ok(value)
    }

    fn take(&mut self, length: usize) -> Result<&'a [u8], WireError> {
        let (head, rest) = self.rest.split_at_checked(length).ok_or(WireError::Truncated)?;
        self.rest = rest;
        Ok(head)
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn finish(self) -> Result<(), WireError> {
        if self.rest.is_empty() { Ok(()) } else { Err(WireError::TrailingBytes) }
    }
}

fn units_from_bytes(bytes: &[u8]) -> Result<Vec<u16>, WireError> {
    if !bytes.len().is_multiple_of(2) {
        return Err(WireError::OddLength);
    }
    let mut units = Vec::new();
    units.try_reserve_exact(bytes.len() / 2).map_err(|_| WireError::OutOfMemory)?;
    units.extend(
        bytes
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0)])),
    );
    Ok(units)
}

fn check_string(bytes: usize, max: usize) -> Result<(), WireError> {
    if !bytes.is_multiple_of(2) {
        return Err(WireError::OddLength);
    }
    if bytes > max {
        return Err(WireError::TooLarge);
    }
    Ok(())
}

/// The fields of a rule, borrowed, for encoding.
#[derive(Clone, Copy)]
struct RuleFields<'a> {
    name: &'a [u16],
    source: &'a [u16],
    target: &'a [u16],
    process: Option<&'a [u16]>,
    method: Method,
    access: Access,
}

impl<'a> From<&'a RuleSpec> for RuleFields<'a> {
    fn from(spec: &'a RuleSpec) -> Self {
        Self {
            name: &spec.name,
            source: &spec.source,
            target: &spec.target,
            process: spec.process.as_deref(),
            method: spec.method,
            access: spec.access,
        }
    }
}

fn byte_len(units: &[u16], max: usize) -> Result<u16, WireError> {
    let bytes = units.len().checked_mul(2).ok_or(WireError::TooLarge)?;
    if bytes > max {
        return Err(WireError::TooLarge);
    }
    u16::try_from(bytes).map_err(|_| WireError::TooLarge)
}

fn record_len(rule: RuleFields<'_>) -> Result<usize, WireError> {
    let strings = [
        byte_len(rule.name, MAX_NAME_BYTES)?,
        byte_len(rule.source, MAX_PATH_BYTES)?,
        byte_len(rule.target, MAX_PATH_BYTES)?,
        byte_len(rule.process.unwrap_or_default(), MAX_PATH_BYTES)?,
    ];
    Ok(strings.iter().fold(size_of::<RuleHeader>(), |sum, &b| sum.saturating_add(usize::from(b))))
}

/// The encoded size of one rule record, for filling a `ListRules` page.
///
/// # Errors
/// [`WireError::TooLarge`] if a string exceeds its limit.
pub fn encoded_rule_len(spec: &RuleSpec) -> Result<usize, WireError> {
    record_len(spec.into())
}

/// Appends to a buffer that was reserved for the whole message, so it never reallocates.
struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn with_capacity(length: usize) -> Result<Self, WireError> {
        if length > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge);
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(length).map_err(|_| WireError::OutOfMemory)?;
        Ok(Self { bytes })
    }

    fn put<T: IntoBytes + Immutable>(&mut self, value: &T) {
        self.bytes.extend_from_slice(value.as_bytes());
    }

    fn put_units(&mut self, units: &[u16]) {
        for unit in units {
            self.bytes.extend_from_slice(&unit.to_le_bytes());
        }
    }

    fn put_rule(&mut self, rule: RuleFields<'_>) -> Result<(), WireError> {
        let process = rule.process.unwrap_or_default();
        let header = RuleHeader {
            record_length: U32::new(u32::try_from(record_len(rule)?).map_err(|_| WireError::TooLarge)?),
            method: rule.method.to_wire(),
            access: rule.access.to_wire(),
            flags: if rule.process.is_some() { HAS_PROCESS } else { 0 },
            reserved: 0,
            name_bytes: U16::new(byte_len(rule.name, MAX_NAME_BYTES)?),
            source_bytes: U16::new(byte_len(rule.source, MAX_PATH_BYTES)?),
            target_bytes: U16::new(byte_len(rule.target, MAX_PATH_BYTES)?),
            process_bytes: U16::new(byte_len(process, MAX_PATH_BYTES)?),
        };
        self.put(&header);
        self.put_units(rule.name);
        self.put_units(rule.source);
        self.put_units(rule.target);
        self.put_units(process);
        Ok(())
    }
}

fn read_rule(reader: &mut Reader<'_>) -> Result<RuleSpec, WireError> {
    let header = reader.read::<RuleHeader>()?;
    if header.reserved != 0 || header.flags & !HAS_PROCESS != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let method = Method::from_wire(header.method).ok_or(WireError::InvalidValue)?;
    let access = Access::from_wire(header.access).ok_or(WireError::InvalidValue)?;
    let name_bytes = usize::from(header.name_bytes.get());
    let source_bytes = usize::from(header.source_bytes.get());
    let target_bytes = usize::from(header.target_bytes.get());
    let process_bytes = usize::from(header.process_bytes.get());
    check_string(name_bytes, MAX_NAME_BYTES)?;
    check_string(source_bytes, MAX_PATH_BYTES)?;
    check_string(target_bytes, MAX_PATH_BYTES)?;
    check_string(process_bytes, MAX_PATH_BYTES)?;
    let has_process = header.flags & HAS_PROCESS != 0;
    if !has_process && process_bytes != 0 {
        return Err(WireError::InvalidValue);
    }
    let expected = [name_bytes, source_bytes, target_bytes, process_bytes]
        .iter()
        .fold(size_of::<RuleHeader>(), |sum, &b| sum.saturating_add(b));
    if header.record_length.get() as usize != expected {
        return Err(WireError::BadRecordLength);
    }
    let name = units_from_bytes(reader.take(name_bytes)?)?;
    let source = units_from_bytes(reader.take(source_bytes)?)?;
    let target = units_from_bytes(reader.take(target_bytes)?)?;
    let process_units = units_from_bytes(reader.take(process_bytes)?)?;
    Ok(RuleSpec { name, source, target, method, access, process: has_process.then_some(process_units) })
}

/// Reads `count` rule records, after checking the remaining bytes could hold that many.
fn read_rules(reader: &mut Reader<'_>, count: usize) -> Result<Vec<RuleSpec>, WireError> {
    if count > MAX_RULES || count.checked_mul(size_of::<RuleHeader>()).is_none_or(|min| min > reader.remaining()) {
        return Err(WireError::TooLarge);
    }
    let mut rules = Vec::new();
    rules.try_reserve_exact(count).map_err(|_| WireError::OutOfMemory)?;
    for _ in 0..count {
        rules.push(read_rule(reader)?);
    }
    Ok(rules)
}

const CRC_TABLE: [u32; 256] = crc_table();

#[expect(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "evaluated only in a constant, where an out-of-bounds index is a compile error"
)]
const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i: u32 = 0;
    while i < 256 {
        let mut crc = i;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            bit += 1;
        }
        table[i as usize] = crc;
        i += 1;
    }
    table
}

/// CRC-32 (IEEE 802.3, as zlib computes it) over several pieces.
fn crc32(pieces: &[&[u8]]) -> u32 {
    let mut crc = u32::MAX;
    for piece in pieces {
        for &byte in *piece {
            let [low, ..] = crc.to_le_bytes();
            let index = usize::from(low ^ byte);
            crc = (crc >> 8) ^ CRC_TABLE.get(index).copied().unwrap_or(0);
        }
    }
    !crc
}

const CHECKSUM_OFFSET: usize = 16;

fn policy_checksum(blob: &[u8]) -> u32 {
    let head = blob.get(..CHECKSUM_OFFSET).unwrap_or_default();
    let tail = blob.get(CHECKSUM_OFFSET.saturating_add(4)..).unwrap_or_default();
    crc32(&[head, &[0; 4], tail])
}

fn policy_len<'a>(rules: impl Iterator<Item = RuleFields<'a>>) -> Result<(usize, usize), WireError> {
    let mut total = size_of::<PolicyHeader>();
    let mut count = 0usize;
    for rule in rules {
        total = total.checked_add(record_len(rule)?).ok_or(WireError::TooLarge)?;
        count = count.saturating_add(1);
    }
    if count > MAX_RULES || total > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    Ok((total, count))
}

fn put_policy<'a>(writer: &mut Writer, rules: impl Iterator<Item = RuleFields<'a>> + Clone) -> Result<(), WireError> {
    let (total, count) = policy_len(rules.clone())?;
    let start = writer.bytes.len();
    writer.put(&PolicyHeader {
        magic: U32::new(POLICY_MAGIC),
        version: U16::new(POLICY_VERSION),
        reserved: U16::ZERO,
        total_length: U32::new(u32::try_from(total).map_err(|_| WireError::TooLarge)?),
        rule_count: U32::new(u32::try_from(count).map_err(|_| WireError::TooLarge)?),
        checksum: U32::ZERO,
        reserved2: U32::ZERO,
    });
    for rule in rules {
        writer.put_rule(rule)?;
    }
    let blob = writer.bytes.get(start..).unwrap_or_default();
    let checksum = policy_checksum(blob).to_le_bytes();
    let at = start.saturating_add(CHECKSUM_OFFSET);
    if let Some(field) = writer.bytes.get_mut(at..at.saturating_add(4)) {
        field.copy_from_slice(&checksum);
    }
    Ok(())
}

/// Encodes rules as a policy blob (what `SetPolicy` carries and the driver persists).
///
/// # Errors
/// [`WireError::TooLarge`] beyond the limits, [`WireError::OutOfMemory`].
pub fn encode_policy(rules: &[RuleSpec]) -> Result<Vec<u8>, WireError> {
    let fields = rules.iter().map(RuleFields::from);
    let mut writer = Writer::with_capacity(policy_len(fields.clone())?.0)?;
    put_policy(&mut writer, fields)?;
    Ok(writer.bytes)
}

/// Encodes a compiled policy as a policy blob, without copying its rules first (the driver persists with this).
///
/// # Errors
/// As [`encode_policy`].
pub fn encode_compiled_policy(policy: &CompiledPolicy) -> Result<Vec<u8>, WireError> {
    let fields = policy.rules().map(|rule| RuleFields {
        name: rule.name(),
        source: rule.source(),
        target: rule.target(),
        process: rule.process(),
        method: rule.method(),
        access: rule.access(),
    });
    let mut writer = Writer::with_capacity(policy_len(fields.clone())?.0)?;
    put_policy(&mut writer, fields)?;
    Ok(writer.bytes)
}

/// Decodes a policy blob.
///
/// # Errors
/// Any malformation: see [`WireError`].
pub fn decode_policy(bytes: &[u8]) -> Result<Vec<RuleSpec>, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    let mut reader = Reader::new(bytes);
    let header = reader.read::<PolicyHeader>()?;
    if header.magic.get() != POLICY_MAGIC {
        return Err(WireError::BadMagic);
    }
    if header.version.get() != POLICY_VERSION {
        return Err(WireError::UnsupportedVersion(header.version.get()));
    }
    if header.reserved.get() != 0 || header.reserved2.get() != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let declared = header.total_length.get() as usize;
    if declared != bytes.len() {
        return Err(WireError::LengthMismatch { declared, actual: bytes.len() });
    }
    if header.checksum.get() != policy_checksum(bytes) {
        return Err(WireError::BadChecksum);
    }
    let rules = read_rules(&mut reader, header.rule_count.get() as usize)?;
    reader.finish()?;
    Ok(rules)
}

fn header(message_type: u16, request_id: u64, total: usize) -> Result<Header, WireError> {
    Ok(Header {
        magic: U32::new(MESSAGE_MAGIC),
        version: U16::new(PROTOCOL_VERSION),
        message_type: U16::new(message_type),
        total_length: U32::new(u32::try_from(total).map_err(|_| WireError::TooLarge)?),
        reserved: U32::ZERO,
        request_id: U64::new(request_id),
    })
}

/// Encodes a request.
///
/// # Errors
/// [`WireError::TooLarge`] beyond the limits, [`WireError::OutOfMemory`].
pub fn encode_request(request_id: u64, request: &Request) -> Result<Vec<u8>, WireError> {
    let payload = match request {
        Request::Status | Request::ClearPolicy | Request::GetStats => 0,
        Request::SetPolicy(rules) => policy_len(rules.iter().map(RuleFields::from))?.0,
        Request::AddRule(rule) => record_len(rule.into())?,
        Request::RemoveRule(name) => {
            size_of::<RemoveRuleRequest>().saturating_add(usize::from(byte_len(name, MAX_NAME_BYTES)?))
        }
        Request::ListRules { .. } => size_of::<ListRulesRequest>(),
    };
    let total = size_of::<Header>().checked_add(payload).ok_or(WireError::TooLarge)?;
    let mut writer = Writer::with_capacity(total)?;
    writer.put(&header(request.message_type() as u16, request_id, total)?);
    match request {
        Request::Status | Request::ClearPolicy | Request::GetStats => {}
        Request::SetPolicy(rules) => put_policy(&mut writer, rules.iter().map(RuleFields::from))?,
        Request::AddRule(rule) => writer.put_rule(rule.into())?,
        Request::RemoveRule(name) => {
            writer
                .put(&RemoveRuleRequest { name_bytes: U16::new(byte_len(name, MAX_NAME_BYTES)?), reserved: U16::ZERO });
            writer.put_units(name);
        }
        Request::ListRules { start_index, max_reply_bytes } => writer.put(&ListRulesRequest {
            start_index: U32::new(*start_index),
            max_reply_bytes: U32::new(*max_reply_bytes),
        }),
    }
    Ok(writer.bytes)
}

/// Reads and checks a header against the buffer, returning the raw message type and the payload reader.
fn read_header(bytes: &[u8]) -> Result<(u16, u64, Reader<'_>), WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge);
    }
    let mut reader = Reader::new(bytes);
    let header = reader.read::<Header>()?;
    if header.magic.get() != MESSAGE_MAGIC {
        return Err(WireError::BadMagic);
    }
    if header.version.get() != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(header.version.get()));
    }
    if header.reserved.get() != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let declared = header.total_length.get() as usize;
    if declared != bytes.len() {
        return Err(WireError::LengthMismatch { declared, actual: bytes.len() });
    }
    Ok((header.message_type.get(), header.request_id.get(), reader))
}

/// Decodes a request: the driver calls this once on its kernel copy of the input buffer.
///
/// # Errors
/// Any malformation: see [`WireError`].
pub fn decode_request(bytes: &[u8]) -> Result<(u64, Request), WireError> {
    let (raw_type, request_id, mut reader) = read_header(bytes)?;
    let message_type = MessageType::from_wire(raw_type).ok_or(WireError::UnknownMessageType(raw_type))?;
    let request = match message_type {
        MessageType::Status => Request::Status,
        MessageType::ClearPolicy => Request::ClearPolicy,
        MessageType::GetStats => Request::GetStats,
        MessageType::SetPolicy => {
            let blob = reader.take(reader.remaining())?;
            Request::SetPolicy(decode_policy(blob)?)
        }
        MessageType::AddRule => Request::AddRule(read_rule(&mut reader)?),
        MessageType::RemoveRule => {
            let fixed = reader.read::<RemoveRuleRequest>()?;
            if fixed.reserved.get() != 0 {
                return Err(WireError::ReservedNotZero);
            }
            let name_bytes = usize::from(fixed.name_bytes.get());
            check_string(name_bytes, MAX_NAME_BYTES)?;
            Request::RemoveRule(units_from_bytes(reader.take(name_bytes)?)?)
        }
        MessageType::ListRules => {
            let fixed = reader.read::<ListRulesRequest>()?;
            Request::ListRules { start_index: fixed.start_index.get(), max_reply_bytes: fixed.max_reply_bytes.get() }
        }
    };
    reader.finish()?;
    Ok((request_id, request))
}

/// Encodes a reply.
///
/// # Errors
/// [`WireError::BodyMismatch`] if the body does not fit the status or the type, [`WireError::TooLarge`],
/// [`WireError::OutOfMemory`].
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, WireError> {
    check_body(reply.message_type, reply.status, &reply.body)?;
    let body_len = match &reply.body {
        ReplyBody::Failed => 0,
        ReplyBody::Generation(_) => size_of::<u64>(),
        ReplyBody::Stats(_) => size_of::<StatsBody>(),
        ReplyBody::Status(status) => status
            .volumes
            .len()
            .checked_mul(16)
            .and_then(|v| v.checked_add(size_of::<StatusBody>()))
            .ok_or(WireError::TooLarge)?,
        ReplyBody::Rules(page) => page.rules.iter().try_fold(size_of::<ListRulesBody>(), |sum, rule| {
            sum.checked_add(record_len(rule.into())?).ok_or(WireError::TooLarge)
        })?,
    };
    let total = size_of::<Header>()
        .checked_add(size_of::<ReplyPrefix>())
        .and_then(|t| t.checked_add(body_len))
        .ok_or(WireError::TooLarge)?;
    let mut writer = Writer::with_capacity(total)?;
    writer.put(&header(reply.message_type as u16 | REPLY_BIT, reply.request_id, total)?);
    writer.put(&ReplyPrefix { status: I32::new(reply.status), reserved: U32::ZERO });
    match &reply.body {
        ReplyBody::Failed => {}
        ReplyBody::Generation(generation) => writer.put(&U64::new(*generation)),
        ReplyBody::Stats(stats) => writer.put(&StatsBody { counters: stats.to_array().map(U64::new) }),
        ReplyBody::Status(status) => {
            writer.put(&StatusBody {
                driver_version: U32::new(status.driver_version),
                protocol_version: U16::new(status.protocol_version),
                reserved: U16::ZERO,
                policy_generation: U64::new(status.policy_generation),
                rule_count: U32::new(status.rule_count),
                volume_count: U32::new(u32::try_from(status.volumes.len()).map_err(|_| WireError::TooLarge)?),
            });
            for volume in &status.volumes {
                writer.put(&volume.0);
            }
        }
        ReplyBody::Rules(page) => {
            writer.put(&ListRulesBody {
                total_rules: U32::new(page.total_rules),
                first_index: U32::new(page.first_index),
                returned: U32::new(u32::try_from(page.rules.len()).map_err(|_| WireError::TooLarge)?),
                reserved: U32::ZERO,
                policy_generation: U64::new(page.policy_generation),
            });
            for rule in &page.rules {
                writer.put_rule(rule.into())?;
            }
        }
    }
    Ok(writer.bytes)
}

fn check_body(message_type: MessageType, status: i32, body: &ReplyBody) -> Result<(), WireError> {
    let fits = match body {
        ReplyBody::Failed => status < 0,
        _ if status < 0 => false,
        ReplyBody::Status(_) => message_type == MessageType::Status,
        ReplyBody::Rules(_) => message_type == MessageType::ListRules,
        ReplyBody::Stats(_) => message_type == MessageType::GetStats,
        ReplyBody::Generation(_) => matches!(
            message_type,
            MessageType::SetPolicy | MessageType::AddRule | MessageType::RemoveRule | MessageType::ClearPolicy
        ),
    };
    if fits { Ok(()) } else { Err(WireError::BodyMismatch) }
}

/// Decodes a reply (`shuntctl` calls this on what `FilterSendMessage` returned).
///
/// # Errors
/// Any malformation: see [`WireError`].
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, WireError> {
    let (raw_type, request_id, mut reader) = read_header(bytes)?;
    let message_type = (raw_type & REPLY_BIT != 0)
        .then(|| MessageType::from_wire(raw_type & !REPLY_BIT))
        .flatten()
        .ok_or(WireError::UnknownMessageType(raw_type))?;
    let prefix = reader.read::<ReplyPrefix>()?;
    if prefix.reserved.get() != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let status = prefix.status.get();
    let body = if status < 0 {
        if reader.remaining() != 0 {
            return Err(WireError::BodyMismatch);
        }
        ReplyBody::Failed
    } else {
        match message_type {
            MessageType::SetPolicy | MessageType::AddRule | MessageType::RemoveRule | MessageType::ClearPolicy => {
                ReplyBody::Generation(reader.read::<U64>()?.get())
            }
            MessageType::GetStats => {
                ReplyBody::Stats(Stats::from_array(reader.read::<StatsBody>()?.counters.map(U64::get)))
            }
            MessageType::Status => {
                let fixed = reader.read::<StatusBody>()?;
                if fixed.reserved.get() != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                let count = fixed.volume_count.get() as usize;
                if count.checked_mul(16).is_none_or(|bytes| bytes > reader.remaining()) {
                    return Err(WireError::TooLarge);
                }
                let mut volumes = Vec::new();
                volumes.try_reserve_exact(count).map_err(|_| WireError::OutOfMemory)?;
                for _ in 0..count {
                    volumes.push(Guid(*reader.read::<[u8; 16]>()?));
                }
                ReplyBody::Status(StatusInfo {
                    driver_version: fixed.driver_version.get(),
                    protocol_version: fixed.protocol_version.get(),
                    policy_generation: fixed.policy_generation.get(),
                    rule_count: fixed.rule_count.get(),
                    volumes,
                })
            }
            MessageType::ListRules => {
                let fixed = reader.read::<ListRulesBody>()?;
                if fixed.reserved.get() != 0 {
                    return Err(WireError::ReservedNotZero);
                }
                let rules = read_rules(&mut reader, fixed.returned.get() as usize)?;
                ReplyBody::Rules(RulePage {
                    total_rules: fixed.total_rules.get(),
                    first_index: fixed.first_index.get(),
                    policy_generation: fixed.policy_generation.get(),
                    rules,
                })
            }
        }
    };
    reader.finish()?;
    Ok(Reply { request_id, message_type, status, body })
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
    use std::{vec, vec::Vec};

    use super::*;

    fn w(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    fn rule(name: &str, process: Option<&str>) -> RuleSpec {
        RuleSpec {
            name: w(name),
            source: w(r"\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\Apps\**"),
            target: w(r"\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\Overlay"),
            method: Method::Reparse,
            access: Access::ReadWrite,
            process: process.map(w),
        }
    }

    fn set_u16(bytes: &mut [u8], at: usize, value: u16) {
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(bytes: &mut [u8], at: usize, value: u32) {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Rewrites a message's total length to its buffer's length, so a test reaches the payload checks.
    fn fix_total(bytes: &mut [u8]) {
        let length = u32::try_from(bytes.len()).unwrap();
        set_u32(bytes, 8, length);
    }

    /// Rewrites a policy blob's checksum (the blob starts at `at`).
    fn fix_checksum(bytes: &mut [u8], at: usize) {
        let checksum = policy_checksum(&bytes[at..]);
        set_u32(bytes, at + CHECKSUM_OFFSET, checksum);
    }

    const RULE_AT: usize = 24 + 24; // header + policy header in a SetPolicy request
    const NAME_BYTES_AT: usize = RULE_AT + 8;

    fn set_policy() -> Vec<u8> {
        encode_request(7, &Request::SetPolicy(vec![rule("a", Some("x.exe")), rule("b", None)])).unwrap()
    }

    #[test]
    fn every_request_round_trips() {
        let requests = [
            Request::Status,
            Request::SetPolicy(vec![rule("a", Some("x.exe")), rule("b", None)]),
            Request::SetPolicy(vec![]),
            Request::AddRule(rule("c", None)),
            Request::RemoveRule(w("legacy-config")),
            Request::ListRules { start_index: 3, max_reply_bytes: 65536 },
            Request::ClearPolicy,
            Request::GetStats,
        ];
        for (id, request) in requests.into_iter().enumerate() {
            let id = u64::try_from(id).unwrap() << 40;
            let bytes = encode_request(id, &request).unwrap();
            assert_eq!(decode_request(&bytes).unwrap(), (id, request));
        }
    }

    #[test]
    fn every_reply_round_trips() {
        let guid = Guid([7; 16]);
        let replies = [
            (
                MessageType::Status,
                0,
                ReplyBody::Status(StatusInfo {
                    driver_version: 0x0001_0002,
                    protocol_version: 1,
                    policy_generation: 9,
                    rule_count: 2,
                    volumes: vec![guid, Guid([1; 16])],
                }),
            ),
            (MessageType::SetPolicy, 0, ReplyBody::Generation(10)),
            (
                MessageType::ListRules,
                0,
                ReplyBody::Rules(RulePage {
                    total_rules: 5,
                    first_index: 1,
                    policy_generation: 10,
                    rules: vec![rule("a", None), rule("b", Some(r"C:\x.exe"))],
                }),
            ),
            (
                MessageType::GetStats,
                0,
                ReplyBody::Stats(Stats { creates_seen: 1, paging_refused: 8, ..Stats::default() }),
            ),
            (MessageType::AddRule, -1_073_741_811, ReplyBody::Failed),
        ];
        for (message_type, status, body) in replies {
            let reply = Reply { request_id: 42, message_type, status, body };
            assert_eq!(decode_reply(&encode_reply(&reply).unwrap()).unwrap(), reply);
        }
    }

    #[test]
    fn policy_blob_round_trips_and_matches_the_compiled_encoding() {
        let rules = vec![rule("a", Some("x.exe")), rule("b", None)];
        let blob = encode_policy(&rules).unwrap();
        assert_eq!(decode_policy(&blob).unwrap(), rules);
        let compiled = CompiledPolicy::new(
            &[RuleSpec { target: w(r"\\?\Volume{0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}\Elsewhere"), ..rule("a", None) }],
            crate::VolumeNames::GuidsOnly,
        )
        .unwrap();
        let specs = compiled.to_specs().unwrap();
        assert_eq!(encode_compiled_policy(&compiled).unwrap(), encode_policy(&specs).unwrap());
    }

    #[test]
    fn buffer_shorter_than_a_header() {
        let bytes = encode_request(1, &Request::Status).unwrap();
        assert_eq!(decode_request(&bytes[..23]), Err(WireError::Truncated));
        assert_eq!(decode_request(&[]), Err(WireError::Truncated));
    }

    #[test]
    fn total_length_larger_than_the_buffer() {
        let mut bytes = encode_request(1, &Request::GetStats).unwrap();
        set_u32(&mut bytes, 8, 25);
        assert_eq!(decode_request(&bytes), Err(WireError::LengthMismatch { declared: 25, actual: 24 }));
    }

    #[test]
    fn total_length_smaller_than_the_buffer() {
        let mut bytes = encode_request(1, &Request::GetStats).unwrap();
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(decode_request(&bytes), Err(WireError::LengthMismatch { declared: 24, actual: 26 }));
    }

    #[test]
    fn bytes_after_the_payload() {
        let mut bytes = encode_request(1, &Request::ListRules { start_index: 0, max_reply_bytes: 10 }).unwrap();
        bytes.push(0);
        fix_total(&mut bytes);
        assert_eq!(decode_request(&bytes), Err(WireError::TrailingBytes));
        let mut blob = encode_policy(&[rule("a", None)]).unwrap();
        blob.extend_from_slice(&[0, 0]);
        fix_total(&mut blob);
        fix_checksum(&mut blob, 0);
        assert_eq!(decode_policy(&blob), Err(WireError::TrailingBytes));
    }

    #[test]
    fn message_and_policy_lengths_disagree() {
        let mut bytes = set_policy();
        let blob_length = u32::try_from(bytes.len() - 24 + 2).unwrap();
        set_u32(&mut bytes, 24 + 8, blob_length);
        fix_checksum(&mut bytes, 24);
        assert!(matches!(decode_request(&bytes), Err(WireError::LengthMismatch { .. })));
    }

    #[test]
    fn record_length_disagrees_with_its_strings() {
        let mut bytes = set_policy();
        let record = u32::from_le_bytes(bytes[RULE_AT..RULE_AT + 4].try_into().unwrap());
        set_u32(&mut bytes, RULE_AT, record + 2);
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::BadRecordLength));
    }

    #[test]
    fn counts_that_overflow() {
        let mut bytes = set_policy();
        set_u32(&mut bytes, 24 + 12, u32::MAX);
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::TooLarge));
        // A count within MAX_RULES that the remaining bytes cannot hold is refused before allocating.
        set_u32(&mut bytes, 24 + 12, 1000);
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::TooLarge));
        let reply = Reply {
            request_id: 1,
            message_type: MessageType::Status,
            status: 0,
            body: ReplyBody::Status(StatusInfo {
                driver_version: 1,
                protocol_version: 1,
                policy_generation: 1,
                rule_count: 0,
                volumes: vec![],
            }),
        };
        let mut bytes = encode_reply(&reply).unwrap();
        set_u32(&mut bytes, 24 + 8 + 20, u32::MAX);
        assert_eq!(decode_reply(&bytes), Err(WireError::TooLarge));
    }

    #[test]
    fn truncated_strings() {
        let bytes = encode_request(1, &Request::AddRule(rule("abc", None))).unwrap();
        let mut short = bytes[..bytes.len() - 2].to_vec();
        fix_total(&mut short);
        assert_eq!(decode_request(&short), Err(WireError::Truncated));
        let mut remove = encode_request(1, &Request::RemoveRule(w("abc"))).unwrap();
        set_u16(&mut remove, 24, 8);
        assert_eq!(decode_request(&remove), Err(WireError::Truncated));
    }

    #[test]
    fn odd_utf16_lengths() {
        let mut bytes = set_policy();
        set_u16(&mut bytes, NAME_BYTES_AT, 1);
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::OddLength));
        let mut remove = encode_request(1, &Request::RemoveRule(w("abc"))).unwrap();
        set_u16(&mut remove, 24, 5);
        assert_eq!(decode_request(&remove), Err(WireError::OddLength));
    }

    #[test]
    fn strings_beyond_their_limits() {
        let mut bytes = set_policy();
        set_u16(&mut bytes, NAME_BYTES_AT, 512);
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::TooLarge));
        let too_long = RuleSpec { name: vec![0x61; MAX_NAME_UNITS + 1], ..rule("a", None) };
        assert_eq!(encode_request(1, &Request::AddRule(too_long)), Err(WireError::TooLarge));
    }

    #[test]
    fn messages_beyond_the_size_limit() {
        let mut bytes = vec![0u8; MAX_MESSAGE_BYTES + 1];
        bytes[..24].copy_from_slice(&encode_request(1, &Request::Status).unwrap());
        assert_eq!(decode_request(&bytes), Err(WireError::TooLarge));
        assert_eq!(decode_policy(&bytes), Err(WireError::TooLarge));
    }

    #[test]
    fn unknown_version_or_type() {
        let mut bytes = encode_request(1, &Request::Status).unwrap();
        set_u16(&mut bytes, 4, 2);
        assert_eq!(decode_request(&bytes), Err(WireError::UnsupportedVersion(2)));
        let mut bytes = encode_request(1, &Request::Status).unwrap();
        set_u16(&mut bytes, 6, 99);
        assert_eq!(decode_request(&bytes), Err(WireError::UnknownMessageType(99)));
        // A reply type is not a request, and a request type is not a reply.
        set_u16(&mut bytes, 6, REPLY_BIT | 1);
        assert_eq!(decode_request(&bytes), Err(WireError::UnknownMessageType(REPLY_BIT | 1)));
        let mut bytes = encode_request(1, &Request::Status).unwrap();
        bytes.extend_from_slice(&[0; 8]);
        fix_total(&mut bytes);
        assert_eq!(decode_reply(&bytes), Err(WireError::UnknownMessageType(1)));
        let mut blob = encode_policy(&[]).unwrap();
        set_u16(&mut blob, 4, 9);
        assert_eq!(decode_policy(&blob), Err(WireError::UnsupportedVersion(9)));
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_request(1, &Request::Status).unwrap();
        bytes[0] = b'X';
        assert_eq!(decode_request(&bytes), Err(WireError::BadMagic));
        let mut blob = encode_policy(&[]).unwrap();
        blob[0] = b'X';
        assert_eq!(decode_policy(&blob), Err(WireError::BadMagic));
    }

    #[test]
    fn reserved_fields_not_zero() {
        let mut bytes = encode_request(1, &Request::Status).unwrap();
        bytes[12] = 1;
        assert_eq!(decode_request(&bytes), Err(WireError::ReservedNotZero));
        let mut bytes = set_policy();
        bytes[RULE_AT + 7] = 1;
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::ReservedNotZero));
        let mut bytes = set_policy();
        bytes[RULE_AT + 6] = 0x80;
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::ReservedNotZero), "unknown flag bits");
    }

    #[test]
    fn invalid_enumerations() {
        for (offset, value) in [(4, 0u8), (4, 3), (5, 0), (5, 9)] {
            let mut bytes = set_policy();
            bytes[RULE_AT + offset] = value;
            fix_checksum(&mut bytes, 24);
            assert_eq!(decode_request(&bytes), Err(WireError::InvalidValue), "offset {offset} value {value}");
        }
        // Process bytes without the process flag.
        let mut bytes = set_policy();
        bytes[RULE_AT + 6] = 0;
        fix_checksum(&mut bytes, 24);
        assert_eq!(decode_request(&bytes), Err(WireError::InvalidValue));
    }

    #[test]
    fn corrupted_policy_blobs_fail_the_checksum() {
        let mut blob = encode_policy(&[rule("a", None)]).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert_eq!(decode_policy(&blob), Err(WireError::BadChecksum));
    }

    #[test]
    fn reply_bodies_must_fit_their_status() {
        let failed =
            Reply { request_id: 1, message_type: MessageType::Status, status: -1, body: ReplyBody::Generation(1) };
        assert_eq!(encode_reply(&failed), Err(WireError::BodyMismatch));
        let ok =
            Reply { request_id: 1, message_type: MessageType::SetPolicy, status: 0, body: ReplyBody::Generation(1) };
        let mut bytes = encode_reply(&ok).unwrap();
        set_u32(&mut bytes, 24, 0xC000_0001);
        assert_eq!(decode_reply(&bytes), Err(WireError::BodyMismatch));
    }

    #[test]
    fn crc_is_the_standard_crc32() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    }
}
