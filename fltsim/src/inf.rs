//! A parser for Windows INF files, and the part of an install that a minifilter's INF describes: the service key
//! and the values its `AddReg` sections write.
//!
//! The syntax follows the INF reference (<https://learn.microsoft.com/windows-hardware/drivers/install/general-syntax-rules-for-inf-files>):
//! `[section]` headers, `key = value, value` entries, `;` comments, `"quoted"` strings with `""` for a quote,
//! `%token%` substitution from `[Strings]`, and a trailing `\` continuing a line. Section names compare
//! case-insensitively. Platform and OS decorations (`DefaultInstall.NTamd64.10.0...26100`) are chosen as Windows
//! chooses them: the most specific section whose build number is not above the target's.

use std::{collections::BTreeMap, fmt};

/// One line of a section: an optional key and its comma-separated values, with strings substituted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The text before `=`, if there was one.
    pub key: Option<String>,
    /// The values, unquoted and with `%token%` replaced.
    pub values: Vec<String>,
    /// The 1-based line number in the file.
    pub line: usize,
}

impl Entry {
    /// The value at `index`, or "".
    #[must_use]
    pub fn value(&self, index: usize) -> &str {
        self.values.get(index).map_or("", String::as_str)
    }
}

/// A parsed INF file.
#[derive(Clone, Debug, Default)]
pub struct Inf {
    sections: Vec<(String, Vec<Entry>)>,
    strings: BTreeMap<String, String>,
    unresolved: Vec<String>,
}

/// Why an INF could not be parsed or installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfError(pub String);

impl fmt::Display for InfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InfError {}

fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = strip_comment(raw);
        let trimmed = line.trim_end();
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(head) = trimmed.strip_suffix('\\') {
            text.push_str(head);
            pending = Some((start, text));
        } else {
            text.push_str(trimmed);
            out.push((start, text));
        }
    }
    if let Some(last) = pending {
        out.push(last);
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Splits `text` at unquoted commas, removing quotes (`""` inside quotes is one `"`), keeping each field's raw
/// text for substitution.
fn split_fields(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut current).trim().to_owned()),
            _ => current.push(c),
        }
    }
    fields.push(current.trim().to_owned());
    fields
}

impl Inf {
    /// Parses INF text.
    ///
    /// # Errors
    /// A line outside any section, or a malformed section header.
    pub fn parse(text: &str) -> Result<Self, InfError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut raw_sections: Vec<(String, Vec<(usize, String)>)> = Vec::new();
        for (line, content) in logical_lines(text) {
            let content = content.trim();
            if content.is_empty() {
                continue;
            }
            if let Some(rest) = content.strip_prefix('[') {
                let name = rest
                    .strip_suffix(']')
                    .ok_or_else(|| InfError(format!("line {line}: section header without ']'")))?
                    .trim();
                raw_sections.push((name.to_owned(), Vec::new()));
                continue;
            }
            let Some((_, lines)) = raw_sections.last_mut() else {
                return Err(InfError(format!("line {line}: entry outside any section")));
            };
            lines.push((line, content.to_owned()));
        }
        let mut inf = Self::default();
        // [Strings] first, so every other section can be substituted.
        for (name, lines) in &raw_sections {
            if name.eq_ignore_ascii_case("Strings") {
                for (_, text) in lines {
                    if let Some((key, value)) = text.split_once('=') {
                        let value = split_fields(value).concat();
                        inf.strings.insert(key.trim().to_ascii_lowercase(), value);
                    }
                }
            }
        }
        for (name, lines) in raw_sections {
            let mut entries = Vec::new();
            for (line, text) in lines {
                let (key, rest) = match text.split_once('=') {
                    Some((k, v)) if !k.contains('"') && !k.contains(',') => (Some(k.trim().to_owned()), v.to_owned()),
                    _ => (None, text.clone()),
                };
                let values = split_fields(&rest).into_iter().map(|v| inf.substitute(&v)).collect();
                entries.push(Entry { key, values, line });
            }
            inf.sections.push((name, entries));
        }
        Ok(inf)
    }

    fn substitute(&mut self, value: &str) -> String {
        let mut out = String::new();
        let mut rest = value;
        while let Some(start) = rest.find('%') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = after.find('%') else {
                out.push_str(&rest[start..]);
                return out;
            };
            let token = &after[..end];
            if token.is_empty() {
                out.push('%');
            } else if let Some(s) = self.strings.get(&token.to_ascii_lowercase()) {
                out.push_str(s);
            } else if token.chars().all(|c| c.is_ascii_digit()) {
                // A DIRID such as %13%: kept as written.
                out.push('%');
                out.push_str(token);
                out.push('%');
            } else {
                self.unresolved.push(token.to_owned());
                out.push('%');
                out.push_str(token);
                out.push('%');
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    /// The names of every section, in file order.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.iter().map(|(n, _)| n.as_str())
    }

    /// The entries of `name` (case-insensitive), if the section exists.
    #[must_use]
    pub fn section(&self, name: &str) -> Option<&[Entry]> {
        self.sections.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, e)| e.as_slice())
    }

    /// The first value of `key` in `section`.
    #[must_use]
    pub fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.section(section)?
            .iter()
            .find(|e| e.key.as_deref().is_some_and(|k| k.eq_ignore_ascii_case(key)))
            .map(|e| e.value(0))
    }

    /// The `[Strings]` table (keys lower-cased).
    #[must_use]
    pub fn strings(&self) -> &BTreeMap<String, String> {
        &self.strings
    }

    /// `%tokens%` that `[Strings]` does not define.
    #[must_use]
    pub fn unresolved_tokens(&self) -> &[String] {
        &self.unresolved
    }

    /// The most specific decoration of `base` (for example `DefaultInstall`) for `arch` (`NTamd64`, `NTarm64`) on
    /// Windows build `build`: `base.arch.10.0...N` with the greatest `N ≤ build`, else `base.arch`, else `base`.
    #[must_use]
    pub fn decorated_section(&self, base: &str, arch: &str, build: u32) -> Option<String> {
        let prefix = format!("{base}.{arch}").to_ascii_lowercase();
        let mut best: Option<(u32, String)> = None;
        for name in self.section_names() {
            let lower = name.to_ascii_lowercase();
            let Some(rest) = lower.strip_prefix(&prefix) else { continue };
            let min_build = if rest.is_empty() {
                0
            } else if let Some(decoration) = rest.strip_prefix('.') {
                // NT<arch>.<major>.<minor>.<product>.<suite>.<build>: only the build field is used here.
                let fields: Vec<&str> = decoration.split('.').collect();
                if fields.len() != 5 || fields.first() != Some(&"10") || fields.get(1) != Some(&"0") {
                    continue;
                }
                match fields.get(4).map(|b| b.parse::<u32>()) {
                    Some(Ok(b)) => b,
                    _ => continue,
                }
            } else {
                continue;
            };
            if min_build <= build && best.as_ref().is_none_or(|(b, _)| min_build > *b) {
                best = Some((min_build, name.to_owned()));
            }
        }
        best.map(|(_, n)| n).or_else(|| self.section(base).map(|_| base.to_owned()))
    }
}

/// A registry value an INF writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegValue {
    /// `REG_SZ` (AddReg flag 0x00000000).
    Sz(String),
    /// `REG_DWORD` (AddReg flag 0x00010001).
    Dword(u32),
    /// `REG_MULTI_SZ` (AddReg flag 0x00010000).
    MultiSz(Vec<String>),
}

/// What installing the INF's service does: the service's values and every `HKR` value its `AddReg` sections
/// write, relative to the service key.
#[derive(Clone, Debug, Default)]
pub struct ServiceInstall {
    /// The service name (`AddService`'s first field).
    pub name: String,
    /// The install sections that were chosen, for messages.
    pub sections: Vec<String>,
    /// Values of the service key itself: `Type`, `Start`, `ErrorControl`, `ImagePath`, `Group`, `DependOnService`.
    pub service_values: BTreeMap<String, RegValue>,
    /// `(subkey relative to the service key, value name, value)`.
    pub values: Vec<(String, String, RegValue)>,
}

fn parse_number(text: &str) -> Option<u32> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

impl Inf {
    /// Installs the `DefaultInstall` services of the INF as Windows build `build` on `arch` would, returning the
    /// registry values written.
    ///
    /// # Errors
    /// A missing section, an `AddService` line without a service-install section, or an `AddReg` line that is not
    /// `HKR` or has a type this model does not know.
    pub fn install_service(&self, arch: &str, build: u32) -> Result<ServiceInstall, InfError> {
        let install = self
            .decorated_section("DefaultInstall", arch, build)
            .ok_or_else(|| InfError(format!("no DefaultInstall section for {arch}")))?;
        let services_name = format!("{install}.Services");
        let services = self.section(&services_name).ok_or_else(|| InfError(format!("no [{services_name}] section")))?;
        let add = services
            .iter()
            .find(|e| e.key.as_deref().is_some_and(|k| k.eq_ignore_ascii_case("AddService")))
            .ok_or_else(|| InfError(format!("[{services_name}] has no AddService")))?;
        let mut result = ServiceInstall {
            name: add.value(0).to_owned(),
            sections: vec![install.clone(), services_name],
            ..ServiceInstall::default()
        };
        let service_section = add.value(2);
        let service =
            self.section(service_section).ok_or_else(|| InfError(format!("no [{service_section}] section")))?;
        result.sections.push(service_section.to_owned());
        for entry in service {
            let Some(key) = entry.key.as_deref() else { continue };
            let number = || {
                parse_number(entry.value(0))
                    .map(RegValue::Dword)
                    .ok_or_else(|| InfError(format!("line {}: {key} is not a number", entry.line)))
            };
            match key.to_ascii_lowercase().as_str() {
                "servicetype" => drop(result.service_values.insert("Type".into(), number()?)),
                "starttype" => drop(result.service_values.insert("Start".into(), number()?)),
                "errorcontrol" => drop(result.service_values.insert("ErrorControl".into(), number()?)),
                "servicebinary" => {
                    drop(result.service_values.insert("ImagePath".into(), RegValue::Sz(entry.value(0).to_owned())));
                }
                "loadordergroup" => {
                    drop(result.service_values.insert("Group".into(), RegValue::Sz(entry.value(0).to_owned())));
                }
                "dependencies" => drop(
                    result.service_values.insert("DependOnService".into(), RegValue::MultiSz(entry.values.clone())),
                ),
                "addreg" => {
                    for name in &entry.values {
                        self.add_reg(name, &mut result)?;
                    }
                    result.sections.push(entry.values.join(","));
                }
                _ => {}
            }
        }
        Ok(result)
    }

    fn add_reg(&self, name: &str, result: &mut ServiceInstall) -> Result<(), InfError> {
        let section = self.section(name).ok_or_else(|| InfError(format!("no AddReg section [{name}]")))?;
        for entry in section {
            let mut fields = entry.values.clone();
            if let Some(key) = &entry.key {
                fields.insert(0, key.clone());
            }
            let root = fields.first().map_or("", String::as_str);
            if !root.eq_ignore_ascii_case("HKR") {
                return Err(InfError(format!("line {}: only HKR is modelled, found {root}", entry.line)));
            }
            let field = |i: usize| fields.get(i).map_or("", String::as_str);
            let flags = parse_number(field(3)).unwrap_or(0);
            let value = match flags {
                0x0000_0000 => RegValue::Sz(field(4).to_owned()),
                0x0001_0001 => RegValue::Dword(
                    parse_number(field(4))
                        .ok_or_else(|| InfError(format!("line {}: REG_DWORD value is not a number", entry.line)))?,
                ),
                0x0001_0000 => RegValue::MultiSz(fields.iter().skip(4).cloned().collect()),
                other => return Err(InfError(format!("line {}: AddReg flags {other:#x} not modelled", entry.line))),
            };
            result.values.push((field(1).to_owned(), field(2).to_owned(), value));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
; comment
[Version]
Signature = "$WINDOWS NT$"
Class     = "Virtualization"   ; trailing comment

[DefaultInstall.NTamd64]
CopyFiles = Files
[DefaultInstall.NTamd64.Services]
AddService = %Svc%,,Svc.Old
[DefaultInstall.NTamd64.10.0...26100]
CopyFiles = Files
[DefaultInstall.NTamd64.10.0...26100.Services]
AddService = %Svc%,,Svc.New

[Svc.Old]
ServiceType = 2
Dependencies = "FltMgr"
AddReg = Reg.Old
[Svc.New]
ServiceType = 2
AddReg = Reg.New
[Reg.Old]
HKR,"Instances","DefaultInstance",0x00000000,%Inst%
HKR,"Instances\"%Inst%,"Altitude",0x00000000,%Alt%
HKR,"Instances\"%Inst%,"Flags",0x00010001,0x0
[Reg.New]
HKR,"Parameters\Instances","DefaultInstance",0x00000000,%Inst%
[Strings]
Svc = "shunt"
Inst = "Shunt ""Instance"""
Alt = "135710"
"#;

    #[test]
    fn parses_sections_quotes_comments_and_strings() {
        let inf = Inf::parse(SAMPLE).unwrap();
        assert_eq!(inf.value("version", "class"), Some("Virtualization"));
        assert_eq!(inf.strings().get("inst").map(String::as_str), Some("Shunt \"Instance\""));
        assert!(inf.unresolved_tokens().is_empty());
    }

    #[test]
    fn chooses_the_install_section_by_build() {
        let inf = Inf::parse(SAMPLE).unwrap();
        assert_eq!(inf.decorated_section("DefaultInstall", "NTamd64", 19045).unwrap(), "DefaultInstall.NTamd64");
        assert_eq!(
            inf.decorated_section("DefaultInstall", "NTamd64", 26100).unwrap(),
            "DefaultInstall.NTamd64.10.0...26100"
        );
        assert_eq!(inf.decorated_section("DefaultInstall", "NTarm64", 26100), None);
    }

    #[test]
    fn installs_hkr_values_relative_to_the_service_key() {
        let inf = Inf::parse(SAMPLE).unwrap();
        let old = inf.install_service("NTamd64", 19045).unwrap();
        assert_eq!(old.name, "shunt");
        assert_eq!(old.service_values.get("Type"), Some(&RegValue::Dword(2)));
        assert_eq!(old.service_values.get("DependOnService"), Some(&RegValue::MultiSz(vec!["FltMgr".into()])));
        assert!(old.values.contains(&(
            "Instances\\Shunt \"Instance\"".into(),
            "Altitude".into(),
            RegValue::Sz("135710".into())
        )));
        let new = inf.install_service("NTamd64", 26100).unwrap();
        assert_eq!(new.values.len(), 1);
        assert_eq!(new.values[0].0, "Parameters\\Instances");
    }

    #[test]
    fn continuation_lines_join() {
        let inf = Inf::parse("[A]\nKey = one,\\\n two\n").unwrap();
        assert_eq!(inf.section("a").unwrap()[0].values, ["one", "two"]);
    }
}
