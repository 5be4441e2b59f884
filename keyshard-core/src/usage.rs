//! Command-line usage: errors as one line (clap renders an error over several lines: the error,
//! a blank line, usage, a hint; every keyshard binary promises one line per error), and the one
//! `KEY=VALUE` splitter the binaries' options share (`--broker VMID=SOCKET`,
//! `--device socket=PATH,fragment=FILE,...`).

/// Why a `KEY=VALUE` option value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    #[error("expected key=value")]
    NoEquals,
    #[error("empty key")]
    EmptyKey,
    #[error("empty value")]
    EmptyValue,
}

/// Splits `KEY=VALUE` at its first `=`; both sides must be non-empty. The value may itself
/// hold `=` (a path may).
pub fn key_value(text: &str) -> Result<(&str, &str), KeyValueError> {
    let (key, value) = text.split_once('=').ok_or(KeyValueError::NoEquals)?;
    if key.is_empty() {
        return Err(KeyValueError::EmptyKey);
    }
    if value.is_empty() {
        return Err(KeyValueError::EmptyValue);
    }
    Ok((key, value))
}

/// The pairs of a comma-separated `KEY=VALUE,KEY=VALUE` list, in order, each split by
/// [`key_value`]. Keys may repeat: what a repeat means is the caller's business.
pub fn key_values(text: &str) -> impl Iterator<Item = Result<(&str, &str), KeyValueError>> {
    text.split(',').map(key_value)
}

/// The rendered usage error `text` as one line: its first paragraph, without the `error: `
/// prefix, the paragraph's further lines joined with commas.
pub fn one_line(text: &str) -> String {
    let mut lines = text
        .lines()
        .map(str::trim)
        .skip_while(|line| line.is_empty())
        .take_while(|line| !line.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let rest: Vec<&str> = lines.collect();
    if rest.is_empty() {
        first.to_owned()
    } else {
        format!("{first} {}", rest.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_error_becomes_its_first_paragraph_on_one_line() {
        let text = "error: invalid value '300' for '--threshold <K>': 300 is not in 0..=255\n\n\
                    Usage: keyshard split --threshold <K>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(text),
            "invalid value '300' for '--threshold <K>': 300 is not in 0..=255"
        );
        let two = "error: the following required arguments were not provided:\n  --manifest <FILE>\n\nUsage: x\n";
        assert_eq!(
            one_line(two),
            "the following required arguments were not provided: --manifest <FILE>"
        );
        assert_eq!(one_line(""), "invalid arguments");
    }

    #[test]
    fn key_value_splits_at_the_first_equals_and_refuses_empty_sides() {
        assert_eq!(key_value("vm1=/run/a=b.sock"), Ok(("vm1", "/run/a=b.sock")));
        assert_eq!(key_value("vm1"), Err(KeyValueError::NoEquals));
        assert_eq!(key_value("=x"), Err(KeyValueError::EmptyKey));
        assert_eq!(key_value("vm1="), Err(KeyValueError::EmptyValue));
        let pairs: Vec<_> = key_values("socket=s,fragment=f,fragment=g").collect();
        assert_eq!(
            pairs,
            [
                Ok(("socket", "s")),
                Ok(("fragment", "f")),
                Ok(("fragment", "g"))
            ]
        );
        assert_eq!(
            key_values("socket=s,,fragment=f").nth(1),
            Some(Err(KeyValueError::NoEquals))
        );
    }
}
