//! The `options` startup parameter (what libpq sends for `PGOPTIONS` / `options=`): split into
//! arguments the way the server does, and the routing tenant read from it.
//!
//! libpq-style splitting: arguments are separated by unescaped whitespace, and a backslash
//! makes the next character literal (`\ ` is a space inside a value, `\\` a backslash). The
//! tenant is set by `-c pgshift.tenant=V`, `-cpgshift.tenant=V` or `--pgshift.tenant=V`; as in
//! the server, dashes in a long option's name count as underscores, and the last setting wins.

/// The custom setting that names the tenant for `sticky = "tenant"` and tenant pins.
pub const TENANT_SETTING: &str = "pgshift.tenant";

/// Splits an `options` value into arguments, honouring backslash escapes.
pub fn split_options(options: &str) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut current = String::new();
    let mut in_argument = false;
    let mut chars = options.chars();
    while let Some(ch) = chars.next() {
        if ch == '\\' {
            in_argument = true;
            if let Some(escaped) = chars.next() {
                current.push(escaped);
            }
        } else if ch.is_ascii_whitespace() {
            if in_argument {
                arguments.push(std::mem::take(&mut current));
                in_argument = false;
            }
        } else {
            in_argument = true;
            current.push(ch);
        }
    }
    if in_argument {
        arguments.push(current);
    }
    arguments
}

/// The `name=value` settings given with `-c` / `--` in an `options` value, in order.
pub fn settings(options: &str) -> Vec<(String, String)> {
    let arguments = split_options(options);
    let mut found = Vec::new();
    let mut index = 0;
    while index < arguments.len() {
        let argument = &arguments[index];
        let assignment = if argument == "-c" {
            index += 1;
            arguments.get(index).map(String::as_str)
        } else if let Some(rest) = argument.strip_prefix("--") {
            Some(rest)
        } else {
            argument.strip_prefix("-c")
        };
        if let Some((name, value)) = assignment.and_then(|text| text.split_once('=')) {
            found.push((name.replace('-', "_"), value.to_string()));
        }
        index += 1;
    }
    found
}

/// The tenant named in an `options` value, if any (the last setting wins).
pub fn tenant(options: &str) -> Option<String> {
    settings(options)
        .into_iter()
        .rev()
        .find(|(name, _)| name == TENANT_SETTING)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_whitespace_with_escapes() {
        assert_eq!(
            split_options("  -c  a=b\\ c   x\\\\y "),
            vec!["-c", "a=b c", "x\\y"]
        );
        assert_eq!(split_options(""), Vec::<String>::new());
        assert_eq!(split_options("\\ "), vec![" "]);
        assert_eq!(split_options("trailing\\"), vec!["trailing"]);
    }

    #[test]
    fn tenant_in_every_spelling() {
        assert_eq!(tenant("-c pgshift.tenant=acme").as_deref(), Some("acme"));
        assert_eq!(tenant("-cpgshift.tenant=acme").as_deref(), Some("acme"));
        assert_eq!(tenant("--pgshift.tenant=acme").as_deref(), Some("acme"));
        assert_eq!(tenant("--pgshift.tenant=a\\ b").as_deref(), Some("a b"));
        assert_eq!(
            tenant("-c search_path=x -c pgshift.tenant=one --pgshift.tenant=two").as_deref(),
            Some("two")
        );
        assert_eq!(tenant("-c statement_timeout=5s"), None);
        assert_eq!(tenant("-c"), None);
        assert_eq!(tenant("-c pgshift.tenant"), None);
        assert_eq!(tenant("-c pgshift.tenant="), Some(String::new()));
    }
}
