//! Shunt's protocol crate: what the driver, `shuntctl` and the tests share.
//!
//! `no_std` with `alloc` and no `unsafe`: the policy model, the compiled path matcher, the NT name rules and the
//! communication-port wire format live here so that the same code runs in the kernel and in user mode.
//!
//! - [`RuleSpec`]: a rule as written; [`CompiledPolicy::new`] validates a list of them as a whole and compiles it.
//! - [`CompiledPolicy::match_path`] and [`CompiledPolicy::could_match`]: the hot path of every create.
//! - [`wire`]: the port messages and the policy blob the driver persists.
//! - [`reference`](mod@reference): the same matching semantics, written plainly, for tests and benchmarks.
//!
//! # Matching semantics
//!
//! A rule's **source** is `X:\...` or `\\?\Volume{GUID}\...` followed by components that are literal, contain `*`
//! (any run of units) or `?` (one UTF-16 unit) within the component, or are exactly `**` (any number of components;
//! a trailing `**` at least one, so `dir\**` is everything *below* `dir`, not `dir` itself). The literal
//! components before the first wildcard are the rule's **literal prefix**. A path matches when its components match
//! the pattern's, one for one. For an exact source the **target** is the backing file; otherwise the part of the
//! path below the literal prefix (the *remainder*, in the caller's spelling) is appended to the target directory.
//!
//! - **Case.** Names compare as NTFS compares them: both sides upcased one UTF-16 unit at a time with the table in
//!   [`upcase`] (its source, version and known differences from NTFS's `$UpCase` are documented there), never
//!   ASCII-only and never by locale: `ä` equals `Ä`, `ß` does not equal `SS`. A create with `SL_CASE_SENSITIVE`
//!   compares the rule's literal parts (prefix, literal characters of wildcard components, suffixes) exactly.
//!   Process conditions always compare case-insensitively.
//! - **Component boundaries.** Prefixes only match whole components: `C:\Apps\Leg\**` does not match
//!   `C:\Apps\Legacy\x`.
//! - **Streams.** `file::$DATA` (any case) is the file itself. A named stream (`file:s`, `file:s:$DATA`) of a file
//!   that matches a rule matches that rule, and [`Match::stream`] carries it: a reparse rule opens the same stream
//!   of the backing file, a forward rule refuses it. A `:` in a directory component that a rule's prefix reaches
//!   (`Apps:$I30:$INDEX_ALLOCATION\x`, which NTFS opens as `Apps\x`) or a stream without a file name is a
//!   [`NameError`], so the spelling cannot bypass a rule. Rules themselves cannot name streams.
//! - **`.` and `..`.** NT names reaching a file system are already resolved, and NTFS and ReFS fail `.`/`..`
//!   components with `STATUS_OBJECT_NAME_INVALID`; the matcher never resolves them. Where it meets one — in a
//!   component that a rule's literal prefix reaches, up to the first component no rule continues with — it reports
//!   a [`NameError`] and the driver fails the create the same way. Past that point no spelling can make the name
//!   match (a `..` leading back would have to be resolved, which the file system refuses), so the rest of the name
//!   is not examined and the create goes on to fail in the file system.
//! - **Trailing dots and spaces.** Win32 strips them before a create is issued; at the NT level `a.ini.` is a
//!   different NTFS file from `a.ini` (creatable through `\\?\`), so they are significant and do not match. Rules
//!   may not contain them.
//! - **Repeated separators** are collapsed when matching (`\Apps\\Legacy` is `\Apps\Legacy`), and a trailing
//!   separator is ignored; the remainder keeps the caller's spelling.
//! - **8.3 short names.** A short alias (`LEGACY~1`) cannot be matched by spelling. [`CompiledPolicy::could_match`]
//!   answers `true` for any opened name containing `~` on a volume with rules, and the driver then matches the
//!   normalized name (`FltGetFileNameInformation` with `FLT_FILE_NAME_NORMALIZED`, which expands short names).
//!   [`CompiledPolicy::match_path`] expects long names.
//! - **Precedence.** When several rules match, the most specific wins: an exact source over any pattern, then the
//!   longer literal prefix (in components), then fewer wildcards (`*` and `?` count one each, `**` one), then file
//!   order. So `C:\Logs\**` (one wildcard) wins over `C:\Logs\**\*.log` (two) for a `.log` file below `C:\Logs`;
//!   give the more specific rule a longer literal prefix, or leave the broader rule out.
//! - **Processes.** A rule's `process` is an image name (compared with the last component of the image path) or a
//!   full image path (compared whole, volume included). The driver passes the image's full path in the policy's
//!   volume form (`\\?\Volume{GUID}\...`), obtained once per process at PASSIVE_LEVEL (`SeLocateProcessImageName`
//!   allocates and is PASSIVE-only) and cached; `PsGetProcessImageFileName` truncates to 15 characters and would
//!   miss longer names. A rule with a process condition never matches an unknown process.
//!
//! # Cost
//!
//! Matching walks the path through a per-volume trie of upcased literal components kept in one hash table, so
//! exact, `dir\**` and `dir\**\*.ext` rules cost `O(path length)` whatever their number: once for the names no
//! rule matches (comparing hashes only), twice for the few that a rule may match (the second walk compares the
//! text). Glob rules (`*`/`?` in
//! a component, `**` in the middle) are tried one by one at the node of their literal prefix: `O(path × pattern)`
//! each, for the glob rules whose literal prefix the path passes through. No allocation, no lock, no panic.
#![no_std]
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

extern crate alloc;

mod compiled;
pub mod name;
mod pattern;
pub mod policy;
pub mod reference;
pub mod upcase;
pub mod wire;

pub use compiled::{CompiledPolicy, Footprint, Match, NameError, Rule, VolumeNames};
pub use name::{Guid, Volume};
pub use pattern::PatternClass;
pub use policy::{Access, Field, Method, PolicyError, Problem, RuleSpec};

/// The version of the port protocol this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
