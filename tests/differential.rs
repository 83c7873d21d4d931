//! The differential property test of issue 4 ("Proof of correctness"): random tables and
//! batches go once through `apply.method = "set-based"` and once through the row-by-row
//! reference (`"row-by-row"`), each in a fresh database of its own, and everything a user
//! can observe must come out the same:
//!
//! - the whole `access_tokens` table, with `updated_at` reduced to whether it moved,
//!   `pass_code_hash` (salted) reduced to which pass code of the vocabulary it verifies
//!   and whether it is the hash the table started with, and generated authentication
//!   codes replaced by placeholders numbered in order of appearance;
//! - the `batches` rows, but for `id`, `started_at`, `finished_at` and `archive_name`;
//! - the names of the files left in `archive` and `failed` (without their time stamp),
//!   the exit code, `.report.json` (but `batch_id` and the times), `.errors.jsonl` and
//!   `.rejects.*` byte for byte, and `.results.jsonl` normalised like the table.
//!
//! Before that, `validate` runs on both (a dry run, which leaves nothing) and must print the
//! same, whichever the method: the set-based dry run checks some rows without writing them
//! (see `src/sightings.rs`). A third of the cases key every row by authentication code, so
//! that this happens.
//!
//! The vocabulary is small on purpose (19 authentication codes, 13 identifiers, 3 pass
//! codes), so that rows often reach the same token, codes move from token to token in
//! chains and swaps, and new values collide: exactly where the set-based path has to sort
//! out which rows depend on each other (SPEC 1.4).
//!
//! `TOKENSYNC_DIFF_CASES` sets the number of cases (default 64; each case migrates two
//! databases and runs the binary twice).

mod common;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use common::TestEnv;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestCaseResult};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// The vocabulary
// ---------------------------------------------------------------------------------------

/// Authentication codes: token `i` of the table has `A<i>`; no token starts with an `N`
/// code, so that rows can give those to tokens and later rows can name tokens by them.
const CODES: [&str; 19] = [
    "A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "A10", "A11", "A12", "A13", "A14",
    "N0", "N1", "N2", "N3",
];
const TABLE_CODES: usize = 15;

/// Identifiers: token `i` of the table may have `I<i>`; no token starts with a `J` one.
const IDENTIFIERS: [&str; 13] = [
    "I0", "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I9", "J0", "J1", "J2",
];
const TABLE_IDENTIFIERS: usize = 10;

/// The pass codes a token may have; `PX` is never set, so it is always a wrong one.
const PASS_CODES: [&str; 3] = ["P0", "P1", "P2"];
const KEY_PASS_CODES: [&str; 4] = ["P0", "P1", "P2", "PX"];

/// The pass code the table gives the token with identifier `I<k>`, so that a row keyed by
/// identifier can name the right one without knowing the table.
fn right_pass_code(identifier: usize) -> usize {
    identifier % PASS_CODES.len()
}

/// Every token starts with this `created_at` and `updated_at`.
const INITIAL_TIME: &str = "2020-01-01T00:00:00Z";
/// The same time as a result of `fields_set` writes it.
const INITIAL_TIME_IN_RESULT: &str = "2020-01-01T00:00:00.000000Z";

const CUSTOM_FIELD_DEFINITIONS: &str = "INSERT INTO custom_field_definitions (name, data_type) \
    VALUES ('tier', 'string'), ('visits', 'integer')";

/// A token's classification; its flags decide where a card number may go and whether a
/// null authentication code generates one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    None,
    Plain,
    Card,
    Auto,
    CardAuto,
}

impl Class {
    const ALL: [Class; 4] = [Class::Plain, Class::Card, Class::Auto, Class::CardAuto];

    /// (id, name, auto_generate_authentication_code, credit_card)
    fn row(self) -> Option<(Uuid, &'static str, bool, bool)> {
        let id = |n: u128| Uuid::from_u128(0xc1a5_0000 + n);
        match self {
            Class::None => None,
            Class::Plain => Some((id(1), "plain", false, false)),
            Class::Card => Some((id(2), "card", false, true)),
            Class::Auto => Some((id(3), "auto", true, false)),
            Class::CardAuto => Some((id(4), "card-auto", true, true)),
        }
    }
}

/// The Argon2id hash of each pass code of [`PASS_CODES`], made once per process.
fn initial_hashes() -> &'static [String] {
    static HASHES: OnceLock<Vec<String>> = OnceLock::new();
    HASHES.get_or_init(|| {
        PASS_CODES
            .iter()
            .map(|p| {
                Argon2::default()
                    .hash_password(p.as_bytes())
                    .expect("a hash")
                    .to_string()
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------
// A case: the settings, the table and the batch file
// ---------------------------------------------------------------------------------------

/// One token of the initial table. Indexes point into the vocabulary.
#[derive(Debug, Clone)]
struct TokenSpec {
    code: usize,
    identifier: Option<usize>,
    pass_code: Option<usize>,
    class: Class,
    card: Option<&'static str>,
    udf_string_1: Option<&'static str>,
    udf_float_1: Option<f64>,
    udf_date_1: Option<&'static str>,
    tier: Option<&'static str>,
    visits: Option<i64>,
}

/// A field of a row: not specified, null, or a value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<T> {
    Absent,
    Null,
    Set(T),
}

/// A scalar as the file holds it: JSON Lines writes `Str` as a JSON string and `Num` as a
/// JSON number; CSV writes the text of both as is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar {
    Str(&'static str),
    Num(&'static str),
}

/// How a row names its token.
#[derive(Debug, Clone, Copy)]
enum Key {
    Code(usize),
    /// An identifier with its right pass code, or with a pass code of [`KEY_PASS_CODES`].
    Identifier(usize, Option<usize>),
    /// No key at all (`IDENTIFIER_REQUIRED`).
    Missing,
}

/// `custom_field_set` of a row. CSV cannot say null or an empty list: there both are
/// written as not specified.
#[derive(Debug, Clone, Copy)]
enum CustomSet {
    Absent,
    Clear,
    Fields {
        tier: Val<Scalar>,
        visits: Val<Scalar>,
        /// A field that is not defined (`UNKNOWN_CUSTOM_FIELD`).
        unknown: bool,
    },
}

/// One row of the batch.
#[derive(Debug, Clone)]
struct RowSpec {
    key: Key,
    authentication_code: Val<usize>,
    identifier: Val<usize>,
    pass_code: Val<usize>,
    card: Val<&'static str>,
    udf_string_1: Val<&'static str>,
    udf_float_1: Val<Scalar>,
    udf_date_1: Val<&'static str>,
    custom: CustomSet,
    /// The names, and whether JSON Lines writes them as a list rather than a string.
    fields_set: Option<(Vec<&'static str>, bool)>,
    /// CSV: one cell too many; JSON Lines: the line cut short (`MALFORMED_ROW`).
    malformed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Csv,
    JsonLines,
}

/// Everything one case is made of.
#[derive(Clone)]
struct Case {
    allow_no_identifier_and_pass_code: bool,
    auto_generate_authentication_code: bool,
    skip_row: bool,
    max_failed_rows: Option<u64>,
    /// `apply.chunk_rows` for both runs: small values put chunk boundaries inside the file.
    chunk_rows: Option<usize>,
    format: Format,
    tokens: Vec<TokenSpec>,
    rows: Vec<RowSpec>,
}

impl Case {
    fn file_name(&self) -> &'static str {
        match self.format {
            Format::Csv => "batch.csv",
            Format::JsonLines => "batch.jsonl",
        }
    }

    fn file_text(&self) -> String {
        match self.format {
            Format::Csv => render_csv(&self.rows),
            Format::JsonLines => self.rows.iter().map(render_json_line).collect(),
        }
    }

    fn envs(&self, method: &'static str) -> Vec<(&'static str, String)> {
        let on_row_error = if self.skip_row {
            "skip-row"
        } else {
            "reject-batch"
        };
        let mut envs = vec![
            ("TOKENSYNC_APPLY_METHOD", method.to_owned()),
            ("TOKENSYNC_APPLY_ON_ROW_ERROR", on_row_error.to_owned()),
        ];
        if let Some(max) = self.max_failed_rows {
            envs.push(("TOKENSYNC_APPLY_MAX_FAILED_ROWS", max.to_string()));
        }
        if let Some(rows) = self.chunk_rows {
            envs.push(("TOKENSYNC_APPLY_CHUNK_ROWS", rows.to_string()));
        }
        envs
    }
}

/// Compact: the settings, one line per token, and the file as it is written.
impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Case")?;
        writeln!(
            f,
            "  definition: allow_no_identifier_and_pass_code={} auto_generate_authentication_code={}",
            self.allow_no_identifier_and_pass_code, self.auto_generate_authentication_code
        )?;
        writeln!(
            f,
            "  apply: on_row_error={} max_failed_rows={:?} chunk_rows={:?}",
            if self.skip_row {
                "skip-row"
            } else {
                "reject-batch"
            },
            self.max_failed_rows,
            self.chunk_rows
        )?;
        writeln!(f, "  custom fields: tier (string), visits (integer)")?;
        writeln!(
            f,
            "  tokens (id, code, identifier, pass code, classification, …):"
        )?;
        for (i, token) in self.tokens.iter().enumerate() {
            writeln!(f, "    {}", describe_token(i, token))?;
        }
        writeln!(f, "  {}:", self.file_name())?;
        for line in self.file_text().lines() {
            writeln!(f, "    {line}")?;
        }
        Ok(())
    }
}

fn describe_token(index: usize, token: &TokenSpec) -> String {
    let mut text = format!("{} {}", token_id(index), CODES[token.code]);
    if let Some(i) = token.identifier {
        write!(text, " identifier={}", IDENTIFIERS[i]).unwrap();
    }
    if let Some(p) = token.pass_code {
        write!(text, " pass_code={}", PASS_CODES[p]).unwrap();
    }
    if let Some((_, name, _, _)) = token.class.row() {
        write!(text, " class={name}").unwrap();
    }
    let optional = [
        ("card", token.card.map(str::to_owned)),
        ("udf_string_1", token.udf_string_1.map(|s| format!("{s:?}"))),
        ("udf_float_1", token.udf_float_1.map(|x| x.to_string())),
        ("udf_date_1", token.udf_date_1.map(str::to_owned)),
        ("tier", token.tier.map(str::to_owned)),
        ("visits", token.visits.map(|v| v.to_string())),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            write!(text, " {name}={value}").unwrap();
        }
    }
    text
}

/// Token ids are fixed, so that both databases hold the same ids.
fn token_id(index: usize) -> Uuid {
    Uuid::from_u128(index as u128 + 1)
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Not specified, null or a value, with these weights.
fn val<T: Clone + fmt::Debug + 'static>(
    value: impl Strategy<Value = T> + 'static,
    absent: u32,
    null: u32,
    set: u32,
) -> BoxedStrategy<Val<T>> {
    prop_oneof![
        absent => Just(Val::Absent),
        null => Just(Val::Null),
        set => value.prop_map(Val::Set),
    ]
    .boxed()
}

fn one_of<T: Clone + fmt::Debug + 'static>(values: &'static [T]) -> BoxedStrategy<T> {
    proptest::sample::select(values).boxed()
}

fn maybe<T: Clone + fmt::Debug + 'static>(
    value: impl Strategy<Value = T> + 'static,
    percent_some: u32,
) -> BoxedStrategy<Option<T>> {
    prop_oneof![
        100 - percent_some => Just(None),
        percent_some => value.prop_map(Some),
    ]
    .boxed()
}

/// 3 to 15 tokens. Token `i` has the code `A<i>` and, if it has one, the identifier `I<i>`:
/// rows then name known tokens most of the time by choosing low indexes (see
/// [`known_or_fresh`]).
fn tokens() -> impl Strategy<Value = Vec<TokenSpec>> {
    let token = (
        prop::bool::weighted(0.7),      // has an identifier
        maybe(0..PASS_CODES.len(), 20), // pass code of a token without identifier
        one_of(&[
            Class::None,
            Class::Plain,
            Class::Card,
            Class::Auto,
            Class::CardAuto,
        ]),
        maybe(one_of(&["****1234", "XXXX-XXXX-XXXX-0005"]), 50),
        maybe(one_of(&["x", "y"]), 40),
        maybe(one_of(&[1.5, 0.0, -2.0]), 40),
        maybe(one_of(&["2024-02-29", "1999-12-31"]), 30),
        maybe(one_of(&["gold", "silver"]), 30),
        maybe(one_of(&[3_i64, 12]), 30),
    );
    prop::collection::vec(token, 3..=TABLE_CODES).prop_map(|tokens| {
        let tokens = tokens.into_iter().enumerate();
        tokens
            .map(
                |(i, (has_identifier, pass, class, card, s, x, d, tier, visits))| {
                    let identifier = Some(i).filter(|i| has_identifier && *i < TABLE_IDENTIFIERS);
                    TokenSpec {
                        code: i,
                        identifier,
                        pass_code: identifier.map(right_pass_code).or(pass),
                        class,
                        card: card.filter(|_| matches!(class, Class::Card | Class::CardAuto)),
                        udf_string_1: s,
                        udf_float_1: x,
                        udf_date_1: d,
                        tier,
                        visits,
                    }
                },
            )
            .collect()
    })
}

/// An index into a vocabulary whose first `table` words the table may hold and whose
/// others are fresh: most often a low one (the table has at least three tokens), often a
/// fresh one, which an earlier row may have given to a token.
fn known_or_fresh(table: usize, len: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0..4_usize,
        3 => 0..(table / 2),
        2 => 0..table,
        3 => table..len,
    ]
}

fn code() -> impl Strategy<Value = usize> {
    known_or_fresh(TABLE_CODES, CODES.len())
}

fn identifier() -> impl Strategy<Value = usize> {
    known_or_fresh(TABLE_IDENTIFIERS, IDENTIFIERS.len())
}

/// A code to give a token: mostly a fresh one, so that it is free (or was just taken by an
/// earlier row of the file).
fn new_code() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => TABLE_CODES..CODES.len(),
        1 => code(),
    ]
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        14 => code().prop_map(Key::Code),
        5 => (identifier(), maybe(0..KEY_PASS_CODES.len(), 30))
            .prop_map(|(i, p)| Key::Identifier(i, p)),
    ]
}

fn card() -> BoxedStrategy<Val<&'static str>> {
    let masked = one_of(&["****1234", "XXXX-XXXX-XXXX-0005"]);
    val(masked, 84, 6, 10)
}

fn udf_float() -> BoxedStrategy<Val<Scalar>> {
    let numbers = &[
        Scalar::Num("1.5"),
        Scalar::Num("0"),
        Scalar::Num("-2"),
        Scalar::Num("1e3"),
        Scalar::Num("-0"), // equal to 0, yet not the same bits
    ];
    val(one_of(numbers), 55, 10, 35)
}

fn udf_date() -> BoxedStrategy<Val<&'static str>> {
    val(one_of(&["2024-02-29", "2025-01-01"]), 60, 10, 30)
}

fn custom_set() -> impl Strategy<Value = CustomSet> {
    let tier = one_of(&[Scalar::Str("gold"), Scalar::Str("silver")]);
    let visits = one_of(&[Scalar::Num("3"), Scalar::Num("12")]);
    let fields = (val(tier, 40, 20, 40), val(visits, 50, 15, 35)).prop_map(|(tier, visits)| {
        CustomSet::Fields {
            tier,
            visits,
            unknown: false,
        }
    });
    prop_oneof![
        60 => Just(CustomSet::Absent),
        5 => Just(CustomSet::Clear),
        35 => fields,
    ]
}

fn fields_set() -> impl Strategy<Value = Option<(Vec<&'static str>, bool)>> {
    let names = &[
        "id",
        "authentication_code",
        "identifier",
        "card_masked_number",
        "udf_string_1",
        "udf_float_1",
        "udf_date_1",
        "custom_field_set",
        "classification_id",
        "created_at",
        "updated_at",
    ];
    let names = prop::collection::vec(one_of(names), 1..5);
    maybe((names, any::<bool>()), 40)
}

/// What makes a row invalid before it reaches the database.
#[derive(Debug, Clone, Copy)]
enum Defect {
    NotANumber,
    NoSuchDay,
    UnmaskedCard,
    UnknownCustomField,
    NotAnInteger,
    PassCodeInFieldsSet,
    MissingKey,
    Malformed,
}

impl Defect {
    const ALL: [Defect; 8] = [
        Defect::NotANumber,
        Defect::NoSuchDay,
        Defect::UnmaskedCard,
        Defect::UnknownCustomField,
        Defect::NotAnInteger,
        Defect::PassCodeInFieldsSet,
        Defect::MissingKey,
        Defect::Malformed,
    ];

    fn spoil(self, row: &mut RowSpec) {
        match self {
            Defect::NotANumber => row.udf_float_1 = Val::Set(Scalar::Str("abc")),
            Defect::NoSuchDay => row.udf_date_1 = Val::Set("2023-02-29"),
            Defect::UnmaskedCard => row.card = Val::Set("4111 1111 1111 1111"),
            Defect::UnknownCustomField | Defect::NotAnInteger => {
                let (tier, mut visits) = match row.custom {
                    CustomSet::Fields { tier, visits, .. } => (tier, visits),
                    _ => (Val::Absent, Val::Absent),
                };
                let unknown = matches!(self, Defect::UnknownCustomField);
                if !unknown {
                    visits = Val::Set(Scalar::Str("many"));
                }
                row.custom = CustomSet::Fields {
                    tier,
                    visits,
                    unknown,
                };
            }
            Defect::PassCodeInFieldsSet => row.fields_set = Some((vec!["id", "pass_code"], false)),
            Defect::MissingKey => row.key = Key::Missing,
            Defect::Malformed => row.malformed = true,
        }
    }
}

/// A valid row, and what would spoil it in a case that has invalid rows.
fn row() -> impl Strategy<Value = (RowSpec, Option<Defect>)> {
    let fields = (
        key(),
        val(new_code(), 65, 5, 30),
        val(identifier(), 80, 6, 14),
        val(0..PASS_CODES.len(), 90, 3, 7),
        card(),
        val(one_of(&["x", "y", "a \"quoted\", comma"]), 50, 15, 35),
        udf_float(),
        udf_date(),
    );
    let extras = (custom_set(), fields_set(), maybe(one_of(&Defect::ALL), 7));
    (fields, extras).prop_map(
        |((key, code, identifier, pass_code, card, s, x, d), (custom, fields_set, defect))| {
            let row = RowSpec {
                key,
                authentication_code: code,
                identifier,
                pass_code,
                card,
                udf_string_1: s,
                udf_float_1: x,
                udf_date_1: d,
                custom,
                fields_set,
                malformed: false,
            };
            (row, defect)
        },
    )
}

fn case() -> impl Strategy<Value = Case> {
    let settings = (
        any::<bool>(),              // allow_no_identifier_and_pass_code
        prop::bool::weighted(0.25), // auto_generate_authentication_code
        prop::bool::weighted(0.7),  // on_row_error = skip-row
        maybe(0..6_u64, 25),        // max_failed_rows
        prop_oneof![Just(Format::Csv), Just(Format::JsonLines)],
        any::<bool>(),             // whether rows may be invalid
        maybe(1..8_usize, 50),     // chunk_rows
        prop::bool::weighted(0.3), // every row keyed by authentication code
    );
    let rows = prop::collection::vec(row(), 1..=30);
    (settings, tokens(), rows).prop_map(|(settings, tokens, rows)| {
        let (
            allow_no_identifier,
            auto_generate,
            skip_row,
            max_failed_rows,
            format,
            invalid,
            chunk_rows,
            codes_only,
        ) = settings;
        let rows = rows
            .into_iter()
            .map(|(mut row, defect)| {
                // With no row keyed by identifier, a dry run need not write the plain rows
                // whose codes no other row touches: that path is taken then.
                if let Key::Identifier(identifier, _) = row.key
                    && codes_only
                {
                    row.key = Key::Code(identifier % CODES.len());
                }
                if let Some(defect) = defect.filter(|_| invalid) {
                    defect.spoil(&mut row);
                }
                row
            })
            .collect();
        Case {
            allow_no_identifier_and_pass_code: allow_no_identifier,
            auto_generate_authentication_code: auto_generate,
            skip_row,
            max_failed_rows,
            chunk_rows,
            format,
            tokens,
            rows,
        }
    })
}

// ---------------------------------------------------------------------------------------
// Writing the batch file
// ---------------------------------------------------------------------------------------

/// A cell of a row: null, a string, or a number (as its literal).
#[derive(Debug, Clone)]
enum Cell {
    Null,
    Str(String),
    Num(String),
}

impl Cell {
    fn from_val<T>(val: Val<T>, cell: impl FnOnce(T) -> Cell) -> Option<Cell> {
        match val {
            Val::Absent => None,
            Val::Null => Some(Cell::Null),
            Val::Set(value) => Some(cell(value)),
        }
    }

    fn scalar(scalar: Scalar) -> Cell {
        match scalar {
            Scalar::Str(text) => Cell::Str(text.to_owned()),
            Scalar::Num(literal) => Cell::Num(literal.to_owned()),
        }
    }

    fn text(text: &str) -> Cell {
        Cell::Str(text.to_owned())
    }

    fn json(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Str(text) => Value::from(text.as_str()),
            Cell::Num(literal) => serde_json::from_str(literal).expect("a JSON number"),
        }
    }

    fn csv(&self) -> String {
        match self {
            Cell::Null => "\\N".to_owned(),
            Cell::Str(text) | Cell::Num(text) => csv_quoted(text),
        }
    }
}

fn csv_quoted(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The key of a row as (column, value) pairs, with CSV's dotted names.
fn key_cells(key: Key) -> Vec<(&'static str, Cell)> {
    match key {
        Key::Code(c) => vec![(KEY_CODE, Cell::text(CODES[c]))],
        Key::Identifier(i, pass) => {
            let pass = pass.map_or(PASS_CODES[right_pass_code(i)], |p| KEY_PASS_CODES[p]);
            vec![
                (KEY_IDENTIFIER, Cell::text(IDENTIFIERS[i])),
                (KEY_PASS_CODE, Cell::text(pass)),
            ]
        }
        Key::Missing => Vec::new(),
    }
}

const KEY_CODE: &str = "access_token_identifier.authentication_code";
const KEY_IDENTIFIER: &str = "access_token_identifier.identifier";
const KEY_PASS_CODE: &str = "access_token_identifier.pass_code";

/// The plain fields of a row that it specifies, in column order.
fn field_cells(row: &RowSpec) -> Vec<(&'static str, Cell)> {
    let fields = [
        (
            "authentication_code",
            Cell::from_val(row.authentication_code, |c| Cell::text(CODES[c])),
        ),
        (
            "identifier",
            Cell::from_val(row.identifier, |i| Cell::text(IDENTIFIERS[i])),
        ),
        (
            "pass_code",
            Cell::from_val(row.pass_code, |p| Cell::text(PASS_CODES[p])),
        ),
        ("card_masked_number", Cell::from_val(row.card, Cell::text)),
        ("udf_string_1", Cell::from_val(row.udf_string_1, Cell::text)),
        ("udf_float_1", Cell::from_val(row.udf_float_1, Cell::scalar)),
        ("udf_date_1", Cell::from_val(row.udf_date_1, Cell::text)),
    ];
    fields
        .into_iter()
        .filter_map(|(name, cell)| cell.map(|cell| (name, cell)))
        .collect()
}

/// The custom fields a row gives, as (name, value) pairs.
fn custom_cells(custom: CustomSet) -> Vec<(&'static str, Cell)> {
    let CustomSet::Fields {
        tier,
        visits,
        unknown,
    } = custom
    else {
        return Vec::new();
    };
    let mut cells = Vec::new();
    if let Some(cell) = Cell::from_val(tier, Cell::scalar) {
        cells.push(("tier", cell));
    }
    if let Some(cell) = Cell::from_val(visits, Cell::scalar) {
        cells.push(("visits", cell));
    }
    if unknown {
        cells.push(("nope", Cell::text("1")));
    }
    cells
}

/// A CSV row as (column, cell) pairs, for the columns it specifies.
fn csv_row(row: &RowSpec) -> Vec<(String, Cell)> {
    let mut cells: Vec<(String, Cell)> = key_cells(row.key)
        .into_iter()
        .chain(field_cells(row))
        .map(|(name, cell)| (name.to_owned(), cell))
        .collect();
    for (name, cell) in custom_cells(row.custom) {
        cells.push((format!("custom_field_set.{name}"), cell));
    }
    if let Some((names, _)) = &row.fields_set {
        cells.push(("fields_set".to_owned(), Cell::Str(names.join(","))));
    }
    cells
}

/// The header holds every column some row uses (always the key by code), in a fixed order.
fn render_csv(rows: &[RowSpec]) -> String {
    let all_columns = [
        KEY_CODE,
        KEY_IDENTIFIER,
        KEY_PASS_CODE,
        "authentication_code",
        "identifier",
        "pass_code",
        "card_masked_number",
        "udf_string_1",
        "udf_float_1",
        "udf_date_1",
        "custom_field_set.tier",
        "custom_field_set.visits",
        "custom_field_set.nope",
        "fields_set",
    ];
    let rows: Vec<(Vec<(String, Cell)>, bool)> =
        rows.iter().map(|r| (csv_row(r), r.malformed)).collect();
    let header: Vec<&str> = all_columns
        .into_iter()
        .filter(|column| {
            *column == KEY_CODE
                || rows
                    .iter()
                    .any(|(cells, _)| cells.iter().any(|(name, _)| name == column))
        })
        .collect();
    let mut text = header.join(",") + "\n";
    for (cells, malformed) in rows {
        let line: Vec<String> = header
            .iter()
            .map(|column| {
                let cell = cells.iter().find(|(name, _)| name == column);
                cell.map_or_else(String::new, |(_, cell)| cell.csv())
            })
            .collect();
        text += &line.join(",");
        if malformed {
            text += ",extra";
        }
        text += "\n";
    }
    text
}

fn render_json_line(row: &RowSpec) -> String {
    let mut object = Map::new();
    let key_cells = key_cells(row.key);
    if !key_cells.is_empty() {
        let key: Map<String, Value> = key_cells
            .into_iter()
            .map(|(name, cell)| {
                let name = name.trim_start_matches("access_token_identifier.");
                (name.to_owned(), cell.json())
            })
            .collect();
        object.insert("access_token_identifier".into(), Value::Object(key));
    }
    for (name, cell) in field_cells(row) {
        object.insert(name.into(), cell.json());
    }
    match row.custom {
        CustomSet::Absent => {}
        CustomSet::Clear => {
            object.insert("custom_field_set".into(), Value::Null);
        }
        CustomSet::Fields { .. } => {
            let list = custom_cells(row.custom)
                .into_iter()
                .map(|(name, cell)| Value::Object(Map::from_iter([(name.to_owned(), cell.json())])))
                .collect();
            object.insert("custom_field_set".into(), Value::Array(list));
        }
    }
    if let Some((names, as_list)) = &row.fields_set {
        let value = if *as_list {
            Value::from(names.clone())
        } else {
            Value::from(names.join(","))
        };
        object.insert("fields_set".into(), value);
    }
    let mut line = Value::Object(object).to_string();
    if row.malformed {
        line.pop(); // the closing brace
    }
    line + "\n"
}

// ---------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------

/// A fresh database holding the case's definition, classifications, custom fields and
/// table, with the batch file in `incoming`.
async fn prepare(case: &Case) -> TestEnv {
    let env = TestEnv::new().await;
    let client = &env.client;
    client
        .execute(
            "UPDATE access_token_definition SET allow_no_identifier_and_pass_code = $1, \
             auto_generate_authentication_code = $2",
            &[
                &case.allow_no_identifier_and_pass_code,
                &case.auto_generate_authentication_code,
            ],
        )
        .await
        .unwrap();
    for (id, name, auto_generate, credit_card) in Class::ALL.iter().filter_map(|c| c.row()) {
        client
            .execute(
                "INSERT INTO access_token_classifications \
                 (id, name, auto_generate_authentication_code, credit_card) VALUES ($1, $2, $3, $4)",
                &[&id, &name, &auto_generate, &credit_card],
            )
            .await
            .unwrap();
    }
    env.exec(CUSTOM_FIELD_DEFINITIONS).await;

    let insert = format!(
        "INSERT INTO access_tokens (id, classification_id, authentication_code, identifier, \
         pass_code_hash, card_masked_number, udf_string_1, udf_float_1, udf_date_1, \
         custom_fields, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::date, $10, '{INITIAL_TIME}', '{INITIAL_TIME}')"
    );
    for (i, token) in case.tokens.iter().enumerate() {
        let mut custom_fields = Map::new();
        if let Some(tier) = token.tier {
            custom_fields.insert("tier".into(), Value::from(tier));
        }
        if let Some(visits) = token.visits {
            custom_fields.insert("visits".into(), Value::from(visits));
        }
        let hash = token.pass_code.map(|p| initial_hashes()[p].as_str());
        client
            .execute(
                &insert,
                &[
                    &token_id(i),
                    &token.class.row().map(|(id, ..)| id),
                    &CODES[token.code],
                    &token.identifier.map(|k| IDENTIFIERS[k]),
                    &hash,
                    &token.card,
                    &token.udf_string_1,
                    &token.udf_float_1,
                    &token.udf_date_1,
                    &Value::Object(custom_fields),
                ],
            )
            .await
            .unwrap();
    }
    env.drop_file(case.file_name(), case.file_text());
    env
}

/// What one run leaves that a user can see, normalised where the two runs may
/// legitimately differ.
#[derive(Debug, PartialEq)]
struct Observed {
    exit_code: Option<i32>,
    /// `archive/…` and `failed/…` names without their time stamp; what is left in incoming.
    files: Vec<String>,
    report: Value,
    errors: String,
    results: Vec<Value>,
    rejects: String,
    batches: Vec<Value>,
    tokens: Vec<Value>,
}

/// Replaces generated authentication codes by `<generated N>`, numbered in the order they
/// are met (results first, in line order, then the table, by id).
#[derive(Default)]
struct Normaliser {
    generated: HashMap<String, String>,
}

impl Normaliser {
    fn code(&mut self, code: &mut Value) {
        let Some(text) = code.as_str() else {
            return;
        };
        let is_generated = text.len() == 16
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if is_generated {
            let next = format!("<generated {}>", self.generated.len() + 1);
            let name = self.generated.entry(text.to_owned()).or_insert(next);
            *code = Value::from(name.clone());
        }
    }
}

/// Which pass code of the vocabulary a stored hash verifies, and whether it is the hash the
/// table started with or a new one.
fn describe_hash(hash: &Value) -> Value {
    let Some(hash) = hash.as_str() else {
        return Value::Null;
    };
    if let Some(p) = initial_hashes().iter().position(|h| h == hash) {
        return Value::from(format!("initial hash of {}", PASS_CODES[p]));
    }
    let verifies = |p: &&str| {
        Argon2::default()
            .verify_password(p.as_bytes(), hash)
            .is_ok()
    };
    match PASS_CODES.into_iter().find(verifies) {
        Some(p) => Value::from(format!("new hash of {p}")),
        None => Value::from("a hash of no pass code of the vocabulary"),
    }
}

fn read(path: Option<std::path::PathBuf>) -> String {
    path.map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap_or_default()
}

async fn observe(env: &TestEnv, case: &Case, exit_code: Option<i32>) -> Observed {
    let name = case.file_name();
    let mut normaliser = Normaliser::default();

    let mut files = Vec::new();
    for (folder, dir) in [("archive", env.archive()), ("failed", env.failed())] {
        for entry in env.names_in(&dir) {
            let entry = if common::is_stamped(&entry) {
                entry[17..].to_owned()
            } else {
                entry
            };
            files.push(format!("{folder}/{entry}"));
        }
    }
    for entry in env.names_in(&env.incoming()) {
        files.push(format!("incoming/{entry}"));
    }

    let mut report = match env.processed(name, ".report.json") {
        Some(path) => serde_json::from_str(&read(Some(path))).unwrap(),
        None => Value::Null,
    };
    if let Value::Object(report) = &mut report {
        for key in ["batch_id", "started_at", "finished_at"] {
            report.remove(key);
        }
    }

    let results_text = read(env.processed(name, ".results.jsonl"));
    let mut results = Vec::new();
    for line in results_text.lines() {
        let mut result: Value = serde_json::from_str(line).unwrap();
        if let Some(token) = result
            .get_mut("access_token")
            .and_then(Value::as_object_mut)
        {
            if let Some(code) = token.get_mut("authentication_code") {
                normaliser.code(code);
            }
            if let Some(updated_at) = token.get_mut("updated_at")
                && updated_at.as_str() != Some(INITIAL_TIME_IN_RESULT)
            {
                *updated_at = Value::from("<updated by the batch>");
            }
        }
        results.push(result);
    }

    let rejects_suffix = match case.format {
        Format::Csv => ".rejects.csv",
        Format::JsonLines => ".rejects.jsonl",
    };

    let batches = env
        .client
        .query(
            "SELECT to_jsonb(b) - 'id' - 'started_at' - 'finished_at' - 'archive_name' \
             FROM batches b ORDER BY file_name, status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();

    let rows = env
        .client
        .query(
            &format!(
                "SELECT to_jsonb(t) - 'updated_at', t.updated_at <> '{INITIAL_TIME}' \
                 FROM access_tokens t ORDER BY t.id"
            ),
            &[],
        )
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for row in rows {
        let mut token: Value = row.get(0);
        let is_updated: bool = row.get(1);
        let object = token.as_object_mut().unwrap();
        normaliser.code(object.get_mut("authentication_code").unwrap());
        let hash = describe_hash(&object["pass_code_hash"]);
        object.insert("pass_code_hash".into(), hash);
        object.insert("updated_at_moved".into(), Value::from(is_updated));
        tokens.push(token);
    }

    Observed {
        exit_code,
        files,
        report,
        errors: read(env.processed(name, ".errors.jsonl")),
        results,
        rejects: read(env.processed(name, rejects_suffix)),
        batches,
        tokens,
    }
}

/// Runs the case through both paths, each in its own database, and compares.
fn check_case(case: &Case) -> TestCaseResult {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Both databases are made at once, on two workers of the runtime.
    let set_based = runtime.spawn({
        let case = case.clone();
        async move { prepare(&case).await }
    });
    let row_by_row = runtime.spawn({
        let case = case.clone();
        async move { prepare(&case).await }
    });
    let set_based = runtime.block_on(set_based).unwrap();
    let row_by_row = runtime.block_on(row_by_row).unwrap();

    // First a dry run: `validate` must say the same whichever the method.
    let dry_run = |env: &TestEnv, method: &'static str| {
        let envs = case.envs(method);
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let file = env.incoming().join(case.file_name());
        let output = env.run_with(&["validate", file.to_str().unwrap()], &envs);
        let stdout = common::text(&output.stdout);
        format!("exit code {:?}\n{stdout}", output.status.code())
    };
    let (set_dry_run, row_dry_run) = std::thread::scope(|scope| {
        let set = scope.spawn(|| dry_run(&set_based, "set-based"));
        let row = scope.spawn(|| dry_run(&row_by_row, "row-by-row"));
        (set.join().unwrap(), row.join().unwrap())
    });

    let run = |env: &TestEnv, method: &'static str| {
        let envs = case.envs(method);
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.run_with(&["--run-now"], &envs)
    };
    let (set_output, row_output) = std::thread::scope(|scope| {
        let set = scope.spawn(|| run(&set_based, "set-based"));
        let row = scope.spawn(|| run(&row_by_row, "row-by-row"));
        (set.join().unwrap(), row.join().unwrap())
    });

    let set = runtime.block_on(observe(&set_based, case, set_output.status.code()));
    let row = runtime.block_on(observe(&row_by_row, case, row_output.status.code()));
    drop((set_based, row_by_row));
    if set == row && set_dry_run == row_dry_run {
        return Ok(());
    }

    let mut message = String::from("set-based and row-by-row differ:\n");
    let parts: [(&str, String, String); 9] = [
        ("validate", set_dry_run, row_dry_run),
        (
            "exit code",
            fmt_debug(&set.exit_code),
            fmt_debug(&row.exit_code),
        ),
        ("files", fmt_debug(&set.files), fmt_debug(&row.files)),
        ("report", pretty(&set.report), pretty(&row.report)),
        ("errors", set.errors.clone(), row.errors.clone()),
        (
            "results",
            pretty_lines(&set.results),
            pretty_lines(&row.results),
        ),
        ("rejects", set.rejects.clone(), row.rejects.clone()),
        (
            "batches",
            pretty_lines(&set.batches),
            pretty_lines(&row.batches),
        ),
        (
            "tokens",
            pretty_lines(&set.tokens),
            pretty_lines(&row.tokens),
        ),
    ];
    for (what, set, row) in parts {
        if set != row {
            writeln!(
                message,
                "--- {what}, set-based:\n{set}\n--- {what}, row-by-row:\n{row}"
            )
            .unwrap();
        }
    }
    writeln!(
        message,
        "--- stderr, set-based:\n{}\n--- stderr, row-by-row:\n{}",
        common::text(&set_output.stderr),
        common::text(&row_output.stderr)
    )
    .unwrap();
    Err(TestCaseError::fail(message))
}

fn fmt_debug(value: &impl fmt::Debug) -> String {
    format!("{value:?}")
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap()
}

fn pretty_lines(values: &[Value]) -> String {
    values.iter().map(|v| v.to_string() + "\n").collect()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("TOKENSYNC_DIFF_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        failure_persistence: None,
        // A case takes a second or two; shrinking stops after a few minutes.
        max_shrink_iters: 300,
        max_shrink_time: 10 * 60 * 1000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The set-based path leaves exactly what the row-by-row reference leaves.
    #[test]
    fn set_based_equals_row_by_row(case in case()) {
        check_case(&case)?;
    }
}
