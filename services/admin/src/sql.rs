//! Splitting a migration file into statements.

/// Splits `sql` into statements on `;`, dropping `--` and `/* */` comments and blank
/// statements. Semicolons and comment markers inside quoted strings ('…'), quoted identifiers
/// ("…", `…`) are kept as they are. Each statement is trimmed.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = sql.chars().peekable();

    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                current.push(c);
                // Quoted: copy through the closing quote; a backslash escapes the next char and
                // a doubled quote is a literal quote.
                while let Some(q) = chars.next() {
                    current.push(q);
                    if q == '\\' {
                        if let Some(escaped) = chars.next() {
                            current.push(escaped);
                        }
                    } else if q == c {
                        match chars.next_if_eq(&c) {
                            Some(doubled) => current.push(doubled),
                            None => break,
                        }
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                // Line comment: skip to the end of the line, keep the newline as a separator.
                for n in chars.by_ref() {
                    if n == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = '\0';
                for n in chars.by_ref() {
                    if prev == '*' && n == '/' {
                        break;
                    }
                    prev = n;
                }
                current.push(' ');
            }
            ';' => push_statement(&mut statements, &mut current),
            _ => current.push(c),
        }
    }
    push_statement(&mut statements, &mut current);
    statements
}

fn push_statement(statements: &mut Vec<String>, current: &mut String) {
    // Drop trailing whitespace of each line and blank lines, so that comment-only edits do
    // not change a migration's checksum.
    let cleaned: Vec<&str> = current.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    let statement = cleaned.join("\n");
    let statement = statement.trim();
    if !statement.is_empty() {
        statements.push(statement.to_string());
    }
    current.clear();
}

/// `name` as a backquoted ClickHouse identifier.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// `value` as a single-quoted ClickHouse string literal.
pub fn quote_str(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_strips_comments() {
        let sql = "-- header; with a semicolon\nCREATE TABLE a (x String) -- trailing\nENGINE = Log;\n\n\
                   /* block; */ CREATE VIEW v AS SELECT 'a;--b' AS s, `we;ird` FROM a;\n-- only a comment;\n";
        let got = split_statements(sql);
        assert_eq!(
            got,
            vec![
                "CREATE TABLE a (x String)\nENGINE = Log".to_string(),
                "CREATE VIEW v AS SELECT 'a;--b' AS s, `we;ird` FROM a".to_string(),
            ]
        );
    }

    #[test]
    fn escaped_quotes_stay_inside_strings() {
        let got = split_statements(r"SELECT 'it\'s;' , 'a''b;c'; SELECT 2");
        assert_eq!(got, vec![r"SELECT 'it\'s;' , 'a''b;c'".to_string(), "SELECT 2".to_string()]);
    }

    #[test]
    fn comment_only_edits_keep_statements_equal() {
        let a = split_statements("-- v1\nCREATE TABLE t (x UInt8) ENGINE = Log;");
        let b = split_statements("-- v2, reworded\n\nCREATE TABLE t (x UInt8) ENGINE = Log; -- done\n");
        assert_eq!(a, b);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t_a"), "`t_a`");
        assert_eq!(quote_str("it's"), r"'it\'s'");
    }
}
