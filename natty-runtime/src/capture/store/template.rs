//! Block path templates: `{key}`, `{stream}`, `{durable}`, `{date}`, `{yyyy}`..`{min}` and a
//! key's own fields, each placeholder's value made safe for one path segment; and the UTC
//! calendar the dates come from (no time-zone database: blocks are named in UTC).

use std::fmt::Write as _;

use super::PathVars;

/// Placeholders every template may use, whatever the key.
pub(super) const FIXED_PLACEHOLDERS: &[&str] = &["key", "stream", "durable", "date", "yyyy", "mm", "dd", "hh", "min"];

/// A parsed path template: segments, each a sequence of literal text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Template {
    pub(super) segments: Vec<Vec<Piece>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Literal(String),
    Placeholder(String),
}

impl Template {
    /// Parses `a/{stream}/{key}-x/`: a trailing `/` is allowed, an empty segment is not.
    pub(super) fn parse(text: &str) -> Result<Template, String> {
        let trimmed = text.strip_suffix('/').unwrap_or(text);
        if trimmed.is_empty() {
            return Ok(Template { segments: Vec::new() });
        }
        let mut segments = Vec::new();
        for segment in trimmed.split('/') {
            if segment.is_empty() {
                return Err(format!("the path template `{text}` has an empty segment (`//`)"));
            }
            if segment == "." || segment == ".." {
                return Err(format!("the path template `{text}` has a `{segment}` segment"));
            }
            segments.push(parse_segment(segment, text)?);
        }
        Ok(Template { segments })
    }

    /// The rendered segments, each one valid path part (no `/`, not `.` or `..`, not empty).
    pub(super) fn render(&self, vars: &PathVars<'_>) -> Result<Vec<String>, String> {
        let date = UtcTime::from_unix(vars.window_start);
        let mut parts = Vec::new();
        for segment in &self.segments {
            // `{key}` of a struct key spans several segments: `current` is the one being built.
            let mut current = String::new();
            for piece in segment {
                match piece {
                    Piece::Literal(text) => current.push_str(text),
                    Piece::Placeholder(name) => match name.as_str() {
                        "key" => {
                            if vars.key.is_empty() {
                                current.push('_');
                            }
                            for (i, (_, value)) in vars.key.iter().enumerate() {
                                if i > 0 {
                                    parts.push(std::mem::take(&mut current));
                                }
                                current.push_str(&sanitise(value));
                            }
                        }
                        "stream" => current.push_str(&sanitise(vars.stream)),
                        "durable" => current.push_str(&sanitise(vars.durable)),
                        "date" => {
                            let _ = write!(current, "{:04}-{:02}-{:02}", date.year, date.month, date.day);
                        }
                        "yyyy" => {
                            let _ = write!(current, "{:04}", date.year);
                        }
                        "mm" => {
                            let _ = write!(current, "{:02}", date.month);
                        }
                        "dd" => {
                            let _ = write!(current, "{:02}", date.day);
                        }
                        "hh" => {
                            let _ = write!(current, "{:02}", date.hour);
                        }
                        "min" => {
                            let _ = write!(current, "{:02}", date.minute);
                        }
                        field => match vars.key.iter().find(|(name, _)| name == field) {
                            Some((_, value)) => current.push_str(&sanitise(value)),
                            None => return Err(unknown_placeholder(field, vars.key)),
                        },
                    },
                }
            }
            parts.push(current);
        }
        Ok(parts)
    }
}

pub(super) fn unknown_placeholder(name: &str, key: &[(String, String)]) -> String {
    let known: Vec<String> = FIXED_PLACEHOLDERS
        .iter()
        .map(|name| format!("{{{name}}}"))
        .chain(key.iter().map(|(field, _)| format!("{{{field}}}")))
        .collect();
    format!(
        "the path template uses `{{{name}}}`, which is neither a fixed placeholder nor a field of the key; known: {}",
        known.join(", ")
    )
}

/// Makes a value safe as (part of) one path segment: `.`, `..` and the empty value become
/// `%2E`, `%2E%2E` and `_` (as `PathPart::from` does, plus the empty case); everything else goes
/// through [`encode`]. A rendered segment is therefore never empty, `.` or `..`: a value is none
/// of these, and a literal-only segment of dots is refused by [`Template::parse`].
pub(super) fn sanitise(value: &str) -> String {
    match value {
        "" => "_".to_owned(),
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => encode(value),
    }
}

/// Percent-encodes `/`, control characters and the characters object stores advise against
/// (the set `PathPart::from` encodes) and keeps everything else. Unlike `PathPart::from` it
/// keeps non-ASCII text as it is, so `Zürich` stays readable in bucket listings.
pub(super) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        let encode = c.is_ascii_control()
            || matches!(
                c,
                '/' | '\\' | '{' | '^' | '}' | '%' | '`' | ']' | '"' | '>' | '[' | '~' | '<' | '#' | '|' | '*' | '?'
            );
        if encode {
            let _ = write!(out, "%{:02X}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses one template segment into literal text and `{name}` placeholders. Literal text is
/// encoded as values are, so a `%` or `#` in it cannot break the path either.
pub(super) fn parse_segment(segment: &str, template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = segment;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(format!("the path template `{template}` has a `}}` without `{{`"));
        }
        if open > 0 {
            pieces.push(Piece::Literal(encode(&rest[..open])));
        }
        let after = &rest[open + 1..];
        let close = match after.find(['{', '}']) {
            Some(close) if after[close..].starts_with('}') => close,
            _ => return Err(format!("the path template `{template}` has a `{{` without `}}`")),
        };
        let name = &after[..close];
        if name.is_empty() {
            return Err(format!(
                "the path template `{template}` has an empty placeholder `{{}}`"
            ));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "the path template `{template}` has a placeholder `{{{name}}}`: names are letters, digits and `_`"
            ));
        }
        pieces.push(Piece::Placeholder(name.to_owned()));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(encode(rest)));
    }
    Ok(pieces)
}

/// A UTC calendar time, down to the minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UtcTime {
    pub(super) year: u64,
    pub(super) month: u32,
    pub(super) day: u32,
    pub(super) hour: u32,
    pub(super) minute: u32,
    pub(super) second: u32,
}

impl UtcTime {
    pub(super) fn from_unix(secs: u64) -> UtcTime {
        let (year, month, day) = civil_from_days(secs / 86_400);
        let of_day = secs % 86_400;
        // Both are below 24 and 60: the casts cannot truncate.
        UtcTime {
            year,
            month,
            day,
            hour: (of_day / 3_600) as u32,
            minute: (of_day % 3_600 / 60) as u32,
            second: (of_day % 60) as u32,
        }
    }
}

/// The proleptic Gregorian date of `days` since 1970-01-01, by Howard Hinnant's
/// `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>), restricted to
/// dates from 1970 on so that everything stays unsigned.
pub(super) fn civil_from_days(days: u64) -> (u64, u32, u32) {
    // Shift the epoch to 0000-03-01, so that a leap day is the last day of its "year".
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year, [0, 365]
    let mp = (5 * doy + 2) / 153; // March-based month, [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}
