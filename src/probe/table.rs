//! The probe's table and the SQL text run against it, as pure functions: `--table` parsing,
//! identifier and literal quoting, the DDL and every statement a session sends.
//!
//! The table holds one row per write attempt, keyed by `(run_id, client, seq)`: `run_id` is
//! drawn per run, `client` is the session's number, `seq` counts the session's write attempts.
//! Nothing here talks to a database.

use std::fmt;

/// The table used when `--table` is not given.
pub const DEFAULT_TABLE: &str = "public.pgshift_probe";

/// The longest identifier Postgres keeps (NAMEDATALEN - 1).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// A schema-qualified table name, both parts already folded to lower case as Postgres folds
/// unquoted identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// `schema.name`, or `name` (schema `public`); each part a plain identifier
    /// (`[A-Za-z_][A-Za-z0-9_$]*`, at most 63 bytes), folded to lower case.
    pub fn parse(text: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public", *name),
            [schema, name] => (*schema, *name),
            _ => {
                return Err(format!(
                    "`{text}` is not a table name: write schema.name (e.g. {DEFAULT_TABLE})"
                ));
            }
        };
        Ok(TableName {
            schema: plain_identifier(schema, text)?,
            name: plain_identifier(name, text)?,
        })
    }

    /// The name as SQL, both parts quoted: `"public"."pgshift_probe"`.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.name)
        )
    }

    /// `CREATE TABLE IF NOT EXISTS` with the probe's columns and primary key.
    pub fn create_statement(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\
             run_id text NOT NULL, \
             client integer NOT NULL, \
             seq bigint NOT NULL, \
             payload text NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (run_id, client, seq))",
            self.quoted()
        )
    }

    /// A query that fails unless the table has every column the probe uses.
    pub fn shape_check_query(&self) -> String {
        format!(
            "SELECT run_id, client, seq, payload, created_at FROM {} LIMIT 0",
            self.quoted()
        )
    }

    /// The INSERT with parameters `$1` run_id (text), `$2` client (int4), `$3` seq (int8),
    /// `$4` payload (text).
    pub fn insert_statement(&self) -> String {
        format!(
            "INSERT INTO {} (run_id, client, seq, payload, created_at) VALUES ($1, $2, $3, $4, now())",
            self.quoted()
        )
    }

    /// The INSERT with every value written as a literal, for the simple query protocol.
    pub fn insert_literal(&self, run_id: &str, client: i32, seq: i64, payload: &str) -> String {
        format!(
            "INSERT INTO {} (run_id, client, seq, payload, created_at) VALUES ({}, {client}, {seq}, {}, now())",
            self.quoted(),
            quote_literal(run_id),
            quote_literal(payload)
        )
    }

    /// The read of one row, with parameters `$1` run_id, `$2` client, `$3` seq.
    pub fn read_statement(&self) -> String {
        format!(
            "SELECT seq FROM {} WHERE run_id = $1 AND client = $2 AND seq = $3",
            self.quoted()
        )
    }

    /// The read of one row with literals, for the simple query protocol.
    pub fn read_literal(&self, run_id: &str, client: i32, seq: i64) -> String {
        format!(
            "SELECT seq FROM {} WHERE run_id = {} AND client = {client} AND seq = {seq}",
            self.quoted(),
            quote_literal(run_id)
        )
    }

    /// Every `seq` one client of one run has in the table, in order (`$1` run_id, `$2` client).
    pub fn client_rows_query(&self) -> String {
        format!(
            "SELECT seq FROM {} WHERE run_id = $1 AND client = $2 ORDER BY seq",
            self.quoted()
        )
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}.{}", self.schema, self.name)
    }
}

/// clap's value parser for `--table`.
pub fn parse_table_argument(text: &str) -> Result<TableName, String> {
    TableName::parse(text)
}

fn plain_identifier(part: &str, whole: &str) -> Result<String, String> {
    let mut chars = part.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
    let rest_is_plain = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if !starts_well || !rest_is_plain {
        return Err(format!(
            "`{whole}`: `{part}` is not a plain identifier (letters, digits, _ and $, not starting with a digit)"
        ));
    }
    if part.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "`{whole}`: `{part}` is longer than {MAX_IDENTIFIER_BYTES} bytes"
        ));
    }
    Ok(part.to_ascii_lowercase())
}

/// An identifier in double quotes, inner quotes doubled.
pub fn quote_identifier(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// A string literal in single quotes, inner quotes doubled (standard_conforming_strings).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_lands_in_public_and_names_fold_to_lower_case() {
        let table = TableName::parse("Probe_Rows").expect("valid");
        assert_eq!(table.schema, "public");
        assert_eq!(table.name, "probe_rows");
        let table = TableName::parse("Ops.Probe$1").expect("valid");
        assert_eq!(table.to_string(), "ops.probe$1");
        assert_eq!(table.quoted(), "\"ops\".\"probe$1\"");
    }

    #[test]
    fn names_that_would_need_quoting_are_refused() {
        for bad in [
            "",
            "a.b.c",
            "1table",
            "my table",
            "x;drop",
            "\"quoted\"",
            ".name",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = "a".repeat(64);
        assert!(TableName::parse(&long).is_err());
        assert!(TableName::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn literals_and_identifiers_double_their_quotes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn the_statements_name_the_quoted_table() {
        let table = TableName::parse(DEFAULT_TABLE).expect("valid");
        assert!(
            table
                .create_statement()
                .starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"pgshift_probe\" (")
        );
        assert!(
            table
                .create_statement()
                .contains("PRIMARY KEY (run_id, client, seq)")
        );
        assert_eq!(
            table.insert_literal("r'1", 3, 7, "p"),
            "INSERT INTO \"public\".\"pgshift_probe\" (run_id, client, seq, payload, created_at) VALUES ('r''1', 3, 7, 'p', now())"
        );
        assert_eq!(
            table.read_literal("r1", 3, 7),
            "SELECT seq FROM \"public\".\"pgshift_probe\" WHERE run_id = 'r1' AND client = 3 AND seq = 7"
        );
    }
}
