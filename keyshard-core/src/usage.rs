//! Command-line usage errors as one line: clap renders an error over several lines (the error,
//! a blank line, usage, a hint), and every keyshard binary promises one line per error.

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
}
