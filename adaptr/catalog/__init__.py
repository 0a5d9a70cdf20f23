"""The catalog database: tables, engine and schema migrations."""
