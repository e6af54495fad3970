//! The policy model: the rules an administrator writes, and the errors that reject a policy.
//!
//! A [`RuleSpec`] is one rule as it arrives, from a TOML file through `shuntctl` or from the wire; nothing about it
//! is trusted. [`CompiledPolicy::new`](crate::CompiledPolicy::new) accepts or rejects a whole list of them at once
//! and is the only way to get a policy the matcher can use.

use alloc::vec::Vec;
use core::fmt;

/// The most rules a policy may hold.
pub const MAX_RULES: usize = 100_000;
/// The longest path (source, target or process image path, with its volume prefix) in UTF-16 units, as NT allows.
pub const MAX_PATH_UNITS: usize = 32_767;
/// The longest rule name in UTF-16 units.
pub const MAX_NAME_UNITS: usize = 255;

/// How a redirected file is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Method {
    /// The caller keeps the source open; Shunt serves its data from the backing file.
    Forward = 1,
    /// The open itself is sent to the backing file (`STATUS_REPARSE`).
    Reparse = 2,
}

impl Method {
    /// The wire value.
    #[must_use]
    pub fn to_wire(self) -> u8 {
        self as u8
    }

    /// Reads the wire value.
    #[must_use]
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Forward),
            2 => Some(Self::Reparse),
            _ => None,
        }
    }

    /// The policy-file spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Reparse => "reparse",
        }
    }
}

/// What a redirected caller may do to the backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Access {
    /// Reads only; every write intent is refused.
    ReadOnly = 1,
    /// Reads and writes go to the backing file.
    ReadWrite = 2,
}

impl Access {
    /// The wire value.
    #[must_use]
    pub fn to_wire(self) -> u8 {
        self as u8
    }

    /// Reads the wire value.
    #[must_use]
    pub fn from_wire(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::ReadOnly),
            2 => Some(Self::ReadWrite),
            _ => None,
        }
    }

    /// The policy-file spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "read-only",
            Self::ReadWrite => "read-write",
        }
    }
}

/// One rule as written, before validation. Strings are UTF-16 as the wire and NT carry them, and may be invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// A name unique within the policy.
    pub name: Vec<u16>,
    /// The source pattern: `C:\...` or `\\?\Volume{GUID}\...`, with `*`, `?` and `**`.
    pub source: Vec<u16>,
    /// The backing file (for an exact source) or directory (otherwise), on the same volume forms, no wildcards.
    pub target: Vec<u16>,
    /// Forward or reparse.
    pub method: Method,
    /// Read-only or read-write.
    pub access: Access,
    /// An image name (`legacy.exe`) or a full image path (`C:\Apps\legacy.exe`) the rule is limited to.
    pub process: Option<Vec<u16>>,
}

/// The field of a rule an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// `name`.
    Name,
    /// `source`.
    Source,
    /// `target`.
    Target,
    /// `process`.
    Process,
}

impl Field {
    /// The policy-file key.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Source => "source",
            Self::Target => "target",
            Self::Process => "process",
        }
    }
}

/// What was wrong with a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The field is empty.
    Empty,
    /// A path is longer than [`MAX_PATH_UNITS`] or a name longer than [`MAX_NAME_UNITS`].
    TooLong,
    /// The text holds an unpaired surrogate.
    InvalidUtf16,
    /// The path does not start with `X:\` or `\\?\Volume{GUID}\`.
    NotAbsolute,
    /// A drive letter where only volume GUIDs are accepted (the driver's policies).
    DriveLetter,
    /// The path names the volume root instead of a file or directory on it.
    VolumeRoot,
    /// The path has an empty component (`\\` or a trailing `\`).
    EmptyComponent,
    /// The path has a `.` or `..` component.
    DotComponent,
    /// A component ends with `.` or a space, which Win32 callers can never open.
    TrailingDotOrSpace,
    /// A character NTFS does not allow in names (the unit is given).
    InvalidCharacter(u16),
    /// A `:` (streams are not named by rules; a rule on a file covers its streams).
    Stream,
    /// `*` or `?` where wildcards are not allowed.
    Wildcard,
    /// `**` inside a component instead of being a component of its own.
    MisplacedGlobstar,
    /// The target lies inside the source of the rule given by index (a redirect cycle; it may be the rule itself).
    TargetInsideSource(usize),
    /// The name is used by the earlier rule given by index.
    DuplicateName(usize),
    /// The policy has more than [`MAX_RULES`] rules.
    TooManyRules,
    /// The policy names more than 65,535 volumes.
    TooManyVolumes,
    /// Memory for the compiled policy could not be allocated.
    OutOfMemory,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("is empty"),
            Self::TooLong => {
                write!(f, "is too long (paths: at most {MAX_PATH_UNITS} UTF-16 units, names: {MAX_NAME_UNITS})")
            }
            Self::InvalidUtf16 => f.write_str("is not valid UTF-16 (unpaired surrogate)"),
            Self::NotAbsolute => {
                f.write_str(r"must be an absolute path starting with a drive letter (C:\) or \\?\Volume{GUID}\")
            }
            Self::DriveLetter => f.write_str(
                r"names a drive letter; the driver needs \\?\Volume{GUID}\ (map drive letters with --volume)",
            ),
            Self::VolumeRoot => f.write_str("names the volume root; name a file or directory on the volume"),
            Self::EmptyComponent => f.write_str(r"has an empty path component (a doubled or trailing \)"),
            Self::DotComponent => f.write_str("has a `.` or `..` component"),
            Self::TrailingDotOrSpace => {
                f.write_str("has a component ending in a dot or space, which Windows strips from names")
            }
            Self::InvalidCharacter(unit) => {
                write!(f, "contains the character U+{unit:04X}, which file names cannot contain")
            }
            Self::Stream => f.write_str("contains `:`; rules name files, and cover their streams"),
            Self::Wildcard => f.write_str("wildcards are not allowed here"),
            Self::MisplacedGlobstar => f.write_str("`**` must be a whole path component"),
            Self::TargetInsideSource(_) => f.write_str("lies inside a rule's source (a redirect cycle)"),
            Self::DuplicateName(_) => f.write_str("is used by another rule"),
            Self::TooManyRules => write!(f, "the policy has more than {MAX_RULES} rules"),
            Self::TooManyVolumes => f.write_str("the policy names more than 65535 volumes"),
            Self::OutOfMemory => f.write_str("out of memory while compiling the policy"),
        }
    }
}

/// Why a policy was rejected: the rule (by index in the list), the field and the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The index of the rule at fault, if the error is about one rule.
    pub rule: Option<usize>,
    /// The field at fault, if the error is about one field.
    pub field: Option<Field>,
    /// What was wrong.
    pub problem: Problem,
}

impl PolicyError {
    pub(crate) fn at(rule: usize, field: Field, problem: Problem) -> Self {
        Self { rule: Some(rule), field: Some(field), problem }
    }

    pub(crate) fn whole(problem: Problem) -> Self {
        Self { rule: None, field: None, problem }
    }

    /// Describes the error with rule names taken from `rules` (the list that was rejected), e.g.
    /// `rule "legacy-config": target: wildcards are not allowed here`.
    #[must_use]
    pub fn describe<'a>(&'a self, rules: &'a [RuleSpec]) -> impl fmt::Display + 'a {
        Described { error: self, rules }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described { error: self, rules: &[] }.fmt(f)
    }
}

impl core::error::Error for PolicyError {}

struct Described<'a> {
    error: &'a PolicyError,
    rules: &'a [RuleSpec],
}

impl Described<'_> {
    fn rule_label(&self, f: &mut fmt::Formatter<'_>, index: usize) -> fmt::Result {
        match self.rules.get(index) {
            Some(rule) => {
                f.write_str("rule \"")?;
                for c in char::decode_utf16(rule.name.iter().copied()) {
                    write!(f, "{}", c.unwrap_or(char::REPLACEMENT_CHARACTER).escape_debug())?;
                }
                f.write_str("\"")
            }
            None => write!(f, "rule #{}", index.saturating_add(1)),
        }
    }
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(index) = self.error.rule {
            self.rule_label(f, index)?;
            f.write_str(": ")?;
        }
        if let Some(field) = self.error.field {
            write!(f, "{}: ", field.as_str())?;
        }
        match self.error.problem {
            Problem::Wildcard if self.error.field == Some(Field::Target) => {
                f.write_str("wildcards are not allowed in a target")
            }
            Problem::TargetInsideSource(other) if Some(other) == self.error.rule => {
                f.write_str("lies inside this rule's own source (a redirect cycle)")
            }
            Problem::TargetInsideSource(other) => {
                f.write_str("lies inside the source of ")?;
                self.rule_label(f, other)?;
                f.write_str(" (a redirect cycle)")
            }
            Problem::DuplicateName(other) => {
                f.write_str("is already the name of ")?;
                self.rule_label(f, other)
            }
            problem => write!(f, "{problem}"),
        }
    }
}
