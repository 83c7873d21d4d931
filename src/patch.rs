//! The temporary patch table of the fast lane (see [`crate::plain`]): one line per plain
//! row, with a mask of the columns the row specifies and their values, and the statements
//! that apply those lines.
//!
//! [`stage`] encodes a chunk's lines before the chunk is applied, off the async workers (see
//! [`crate::copy`]). The statements are written for the chunk's `Shape`: a column no row
//! specifies is left out, one that every row specifies is assigned as is, and only the
//! others are assigned with a `CASE` on the row's mask that keeps the current value.

use crate::copy::CopyRows;
use crate::update::{CustomFieldsPatch, Patch, Secret, TokenKey, TokenUpdate};
use serde_json::{Map, Value};
use tokio_postgres::Transaction;
use tokio_postgres::types::{ToSql, Type};

/// Creates the patch table, for the transaction.
pub const PATCH_TABLE_SQL: &str = "CREATE TEMPORARY TABLE tokensync_patch (
    idx int4, key_code text, mask int4,
    authentication_code text, pass_code_hash text, card_masked_number text,
    udf_string_1 text, udf_string_2 text, udf_string_3 text, udf_string_4 text,
    udf_string_5 text, udf_string_6 text, udf_string_7 text, udf_string_8 text,
    udf_float_1 float8, udf_float_2 float8, udf_float_3 float8, udf_float_4 float8,
    udf_date_1 date, udf_date_2 date, udf_date_3 date, udf_date_4 date,
    custom_fields_remove text[], custom_fields_set jsonb
    ) ON COMMIT DROP";

/// The bit of each assignable column in a row's mask, in table order after the key.
const CODE_BIT: i32 = 1;
const PASS_CODE_BIT: i32 = 1 << 1;
const CARD_BIT: i32 = 1 << 2;
const FIRST_UDF_BIT: u32 = 3;
/// The bits of a row's custom fields: it removes every one, removes some, sets some.
const CUSTOM_FIELDS_CLEAR_BIT: i32 = 1 << 19;
const CUSTOM_FIELDS_REMOVE_BIT: i32 = 1 << 20;
const CUSTOM_FIELDS_SET_BIT: i32 = 1 << 21;
const CUSTOM_FIELDS_BITS: i32 =
    CUSTOM_FIELDS_CLEAR_BIT | CUSTOM_FIELDS_REMOVE_BIT | CUSTOM_FIELDS_SET_BIT;

/// The columns of the patch table after `idx`, `key_code` and `mask`, with their types and
/// the bit that says a row specified them. The names of the assignable ones are those of
/// `access_tokens`.
fn columns() -> &'static [(String, Type, i32)] {
    static COLUMNS: std::sync::OnceLock<Vec<(String, Type, i32)>> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        let mut columns = vec![
            ("authentication_code".to_owned(), Type::TEXT, CODE_BIT),
            ("pass_code_hash".to_owned(), Type::TEXT, PASS_CODE_BIT),
            ("card_masked_number".to_owned(), Type::TEXT, CARD_BIT),
        ];
        let udfs = (1..=8)
            .map(|i| (format!("udf_string_{i}"), Type::TEXT))
            .chain((1..=4).map(|i| (format!("udf_float_{i}"), Type::FLOAT8)))
            .chain((1..=4).map(|i| (format!("udf_date_{i}"), Type::DATE)));
        for (n, (name, ty)) in udfs.enumerate() {
            columns.push((name, ty, 1 << (FIRST_UDF_BIT + n as u32)));
        }
        columns.push((
            "custom_fields_remove".to_owned(),
            Type::TEXT_ARRAY,
            CUSTOM_FIELDS_REMOVE_BIT,
        ));
        columns.push((
            "custom_fields_set".to_owned(),
            Type::JSONB,
            CUSTOM_FIELDS_SET_BIT,
        ));
        columns
    })
}

/// The assignable columns of `access_tokens` among [`columns`].
fn assignable() -> impl Iterator<Item = &'static (String, Type, i32)> {
    columns()
        .iter()
        .filter(|(_, _, bit)| bit & CUSTOM_FIELDS_BITS == 0)
}

/// Which columns the rows of a staged set specify: `any` has the bits that some row sets,
/// `all` those that every row sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    any: i32,
    all: i32,
}

impl Shape {
    /// The shape of a set of rows with these masks.
    fn of(masks: &[i32]) -> Shape {
        let mut shape = Shape { any: 0, all: !0 };
        for &mask in masks {
            shape.any |= mask;
            shape.all &= mask;
        }
        if masks.is_empty() {
            shape.all = 0;
        }
        shape
    }

    /// Whether some row specifies the column of `bit`.
    fn has(self, bit: i32) -> bool {
        self.any & bit != 0
    }

    /// How the row `p` tells that it specified the column of `bit`; `None` when every row
    /// did.
    fn test(self, bit: i32) -> Option<String> {
        (self.all & bit == 0).then(|| format!("p.mask & {bit} <> 0"))
    }

    /// The columns of the patch table that rows of this shape fill, in table order.
    fn copy_columns(self) -> impl Iterator<Item = &'static (String, Type, i32)> {
        columns().iter().filter(move |(_, _, bit)| self.has(*bit))
    }

    /// The `COPY` that fills the patch table's columns of this shape.
    fn copy_sql(self) -> String {
        let mut names = vec!["idx", "key_code", "mask"];
        names.extend(self.copy_columns().map(|(name, _, _)| name.as_str()));
        format!(
            "COPY tokensync_patch ({}) FROM STDIN (FORMAT binary)",
            names.join(", ")
        )
    }

    /// The new custom fields of the token `t` under the row `p`; `None` when no row changes
    /// custom fields.
    fn new_custom_fields(self) -> Option<String> {
        if !self.has(CUSTOM_FIELDS_BITS) {
            return None;
        }
        let mut fields = match self.has(CUSTOM_FIELDS_CLEAR_BIT) {
            true => format!(
                "CASE WHEN p.mask & {CUSTOM_FIELDS_CLEAR_BIT} <> 0 THEN '{{}}'::jsonb \
                 ELSE t.custom_fields END"
            ),
            false => "t.custom_fields".to_owned(),
        };
        if self.has(CUSTOM_FIELDS_REMOVE_BIT) {
            fields = format!("({fields} - p.custom_fields_remove)");
        }
        if self.has(CUSTOM_FIELDS_SET_BIT) {
            fields = format!("({fields} || p.custom_fields_set)");
        }
        Some(fields)
    }

    /// Whether the row `p` changes a value of the token `t`: a column it specifies holds
    /// another value, or its custom fields differ.
    fn is_changed(self) -> String {
        let mut tests = Vec::new();
        for (name, _, bit) in assignable().filter(|(_, _, bit)| self.has(*bit)) {
            let differs = format!("p.{name} IS DISTINCT FROM t.{name}");
            tests.push(match self.test(*bit) {
                Some(test) => format!("({test} AND {differs})"),
                None => differs,
            });
        }
        if let Some(fields) = self.new_custom_fields() {
            tests.push(format!("{fields} IS DISTINCT FROM t.custom_fields"));
        }
        if tests.is_empty() {
            return "false".to_owned();
        }
        format!("({})", tests.join("\n            OR "))
    }

    /// Whether the row `p` gives its token an authentication code that another token holds.
    fn is_code_taken(self) -> String {
        if !self.has(CODE_BIT) {
            return "false".to_owned();
        }
        let test = self
            .test(CODE_BIT)
            .map_or(String::new(), |test| format!("{test} AND "));
        format!(
            "({test}p.authentication_code <> p.key_code AND EXISTS (
                SELECT FROM access_tokens o WHERE o.authentication_code = p.authentication_code))"
        )
    }

    /// The statement that applies the staged rows: it finds each row's token by its key,
    /// keeps the current value of every column the row did not specify, and writes only the
    /// rows that pass the checks and change a value. It returns the `idx` of each row it
    /// wrote and the id of its token.
    fn update_sql(self) -> String {
        let mut assignments = Vec::new();
        for (name, _, bit) in assignable().filter(|(_, _, bit)| self.has(*bit)) {
            assignments.push(match self.test(*bit) {
                Some(test) => format!("{name} = CASE WHEN {test} THEN p.{name} ELSE t.{name} END"),
                None => format!("{name} = p.{name}"),
            });
        }
        if let Some(fields) = self.new_custom_fields() {
            assignments.push(format!("custom_fields = {fields}"));
        }
        assignments.push("updated_at = now()".to_owned());
        let takes_card = "EXISTS (SELECT FROM access_token_classifications c \
            WHERE c.id = t.classification_id AND c.credit_card)";
        let card_check = match (self.has(CARD_BIT), self.test(CARD_BIT)) {
            (false, _) => "true".to_owned(),
            (true, Some(test)) => format!("(NOT ({test}) OR {takes_card})"),
            (true, None) => takes_card.to_owned(),
        };
        format!(
            "UPDATE access_tokens t SET
            {assignments}
        FROM tokensync_patch p
        WHERE t.authentication_code = p.key_code
            AND NOT {is_code_taken}
            AND {card_check}
            AND {is_changed}
        RETURNING p.idx, t.id",
            assignments = assignments.join(",\n            "),
            is_code_taken = self.is_code_taken(),
            is_changed = self.is_changed(),
        )
    }

    /// The query that tells, for the staged rows whose `idx` is in `$1` (those the update
    /// left alone, or in a dry run those it need not write), what the checks say: it lists
    /// those whose token exists, with the token's id, whether the row's new code is taken,
    /// whether the token takes card numbers, and whether the row would change it.
    fn verdict_sql(self) -> String {
        format!(
            "SELECT p.idx, t.id, {is_code_taken}, coalesce(c.credit_card, false), {is_changed}
            FROM tokensync_patch p
            JOIN access_tokens t ON t.authentication_code = p.key_code
            LEFT JOIN access_token_classifications c ON c.id = t.classification_id
            WHERE p.idx = ANY($1)",
            is_code_taken = self.is_code_taken(),
            is_changed = self.is_changed(),
        )
    }
}

/// The encoded lines of the patch table for a set of plain rows, one per row, and the shape
/// they share.
#[derive(Debug, Clone)]
pub struct Staged {
    lines: CopyRows,
    shape: Shape,
}

impl Default for Staged {
    fn default() -> Staged {
        Staged {
            lines: CopyRows::default(),
            shape: Shape::of(&[]),
        }
    }
}

impl Staged {
    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Empties the patch table and copies these lines into it.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn copy_in(&self, tx: &Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
        tx.batch_execute("TRUNCATE tokensync_patch").await?;
        self.lines.send(tx, &self.shape.copy_sql()).await
    }

    /// The update that applies the lines (see `Shape::update_sql`).
    pub fn update_sql(&self) -> String {
        self.shape.update_sql()
    }

    /// The query that checks the lines whose `idx` is in `$1` (see `Shape::verdict_sql`).
    pub fn verdict_sql(&self) -> String {
        self.shape.verdict_sql()
    }

    /// The lines at the positions `picked` (ascending). They keep the shape of the whole
    /// set, which fits them too.
    pub fn pick(&self, picked: &[usize]) -> Staged {
        Staged {
            lines: self.lines.pick(picked),
            shape: self.shape,
        }
    }
}

/// The new pass codes of the plain rows `rows` (indexes into `updates`), in order: [`stage`]
/// takes their hashes.
pub fn new_pass_codes(updates: &[&TokenUpdate], rows: &[usize]) -> Vec<Secret> {
    let mut pass_codes = Vec::new();
    for &i in rows {
        if let Patch::Value(pass_code) = &updates[i].pass_code {
            pass_codes.push(pass_code.clone());
        }
    }
    pass_codes
}

/// Encodes the lines of the patch table for the plain rows `rows` (indexes into `updates`,
/// ascending), one per row, with `idx` the row's index; `hashes` are the hashes of
/// [`new_pass_codes`], in order. Needs no database, so it runs before the chunk is applied.
pub fn stage(updates: &[&TokenUpdate], rows: &[usize], hashes: Vec<String>) -> Staged {
    let masks: Vec<i32> = rows.iter().map(|&i| mask_of(updates[i])).collect();
    let shape = Shape::of(&masks);
    let mut types = vec![Type::INT4, Type::TEXT, Type::INT4];
    types.extend(shape.copy_columns().map(|(_, ty, _)| ty.clone()));

    // Each line is encoded as soon as it is made: a chunk's lines all at once would take
    // as much memory as its rows.
    let mut hashes = hashes.into_iter();
    let mut lines = CopyRows::default();
    for (&i, mask) in rows.iter().zip(masks) {
        let idx = i32::try_from(i).expect("a chunk has fewer than 2^31 rows");
        let line = PatchLine::new(idx, updates[i], mask, &mut hashes);
        lines.push(&types, &line.values(shape));
    }
    Staged { lines, shape }
}

/// The bits of the columns a plain row specifies.
fn mask_of(update: &TokenUpdate) -> i32 {
    let udfs_absent = update
        .udf_strings
        .iter()
        .map(Patch::is_absent)
        .chain(update.udf_floats.iter().map(Patch::is_absent))
        .chain(update.udf_dates.iter().map(Patch::is_absent));
    let mut mask = 0;
    for (is_absent, bit) in [
        (update.authentication_code.is_absent(), CODE_BIT),
        (update.pass_code.is_absent(), PASS_CODE_BIT),
        (update.card_masked_number.is_absent(), CARD_BIT),
    ]
    .into_iter()
    .chain(udfs_absent.zip((FIRST_UDF_BIT..).map(|n| 1 << n)))
    {
        if !is_absent {
            mask |= bit;
        }
    }
    match &update.custom_fields {
        CustomFieldsPatch::Absent => {}
        CustomFieldsPatch::Clear => mask |= CUSTOM_FIELDS_CLEAR_BIT,
        CustomFieldsPatch::Change(changes) => {
            for (_, value) in changes {
                mask |= match value {
                    Some(_) => CUSTOM_FIELDS_SET_BIT,
                    None => CUSTOM_FIELDS_REMOVE_BIT,
                };
            }
        }
    }
    mask
}

/// One line of the patch table, before it is encoded.
struct PatchLine<'a> {
    idx: i32,
    key_code: &'a str,
    mask: i32,
    authentication_code: Option<&'a str>,
    pass_code_hash: Option<String>,
    card_masked_number: Option<&'a str>,
    udf_strings: [Option<&'a str>; 8],
    udf_floats: [Option<f64>; 4],
    udf_dates: [Option<chrono::NaiveDate>; 4],
    custom_fields_remove: Vec<&'a str>,
    custom_fields_set: Value,
}

impl<'a> PatchLine<'a> {
    /// The line of `update`, whose bits are `mask` (see [`mask_of`]).
    fn new(
        idx: i32,
        update: &'a TokenUpdate,
        mask: i32,
        hashes: &mut impl Iterator<Item = String>,
    ) -> PatchLine<'a> {
        let mut custom_fields_remove = Vec::new();
        let mut custom_fields_set = Map::new();
        if let CustomFieldsPatch::Change(changes) = &update.custom_fields {
            for (name, value) in changes {
                match value {
                    Some(value) => {
                        custom_fields_set.insert(name.clone(), value.clone());
                    }
                    None => custom_fields_remove.push(name.as_str()),
                }
            }
        }

        let TokenKey::AuthenticationCode(key_code) = &update.key else {
            unreachable!("plain rows name their token by authentication code")
        };
        PatchLine {
            idx,
            key_code: key_code.expose(),
            mask,
            authentication_code: value(&update.authentication_code).map(Secret::expose),
            pass_code_hash: match update.pass_code {
                Patch::Value(_) => hashes.next(),
                _ => None,
            },
            card_masked_number: value(&update.card_masked_number).map(Secret::expose),
            udf_strings: std::array::from_fn(|i| value(&update.udf_strings[i]).map(String::as_str)),
            udf_floats: std::array::from_fn(|i| value(&update.udf_floats[i]).copied()),
            udf_dates: std::array::from_fn(|i| value(&update.udf_dates[i]).copied()),
            custom_fields_remove,
            custom_fields_set: Value::Object(custom_fields_set),
        }
    }

    /// The values of the columns that rows of `shape` fill. The custom field columns hold
    /// an empty list or object, never null, on a row that does not use them, since the
    /// statement applies them to every row.
    fn values(&self, shape: Shape) -> Vec<&(dyn ToSql + Sync)> {
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![
            &self.authentication_code,
            &self.pass_code_hash,
            &self.card_masked_number,
        ];
        all.extend(self.udf_strings.iter().map(|v| v as &(dyn ToSql + Sync)));
        all.extend(self.udf_floats.iter().map(|v| v as &(dyn ToSql + Sync)));
        all.extend(self.udf_dates.iter().map(|v| v as &(dyn ToSql + Sync)));
        all.push(&self.custom_fields_remove);
        all.push(&self.custom_fields_set);

        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&self.idx, &self.key_code, &self.mask];
        for (value, (_, _, bit)) in all.into_iter().zip(columns()) {
            if shape.has(*bit) {
                values.push(value);
            }
        }
        values
    }
}

/// The value of a patch, or `None` when it is absent or null (the mask tells which).
fn value<T>(patch: &Patch<T>) -> Option<&T> {
    match patch {
        Patch::Value(value) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDF_STRING_1_BIT: i32 = 1 << FIRST_UDF_BIT;

    #[test]
    fn a_shape_knows_what_some_and_what_every_row_specifies() {
        let shape = Shape::of(&[CODE_BIT | UDF_STRING_1_BIT, UDF_STRING_1_BIT]);
        assert_eq!(shape.any, CODE_BIT | UDF_STRING_1_BIT);
        assert_eq!(shape.all, UDF_STRING_1_BIT);
        assert_eq!(Shape::of(&[]), Shape { any: 0, all: 0 });
    }

    #[test]
    fn the_update_assigns_only_what_rows_specify() {
        let sql = Shape::of(&[CODE_BIT | UDF_STRING_1_BIT, UDF_STRING_1_BIT]).update_sql();
        assert!(sql.contains("udf_string_1 = p.udf_string_1"), "{sql}");
        assert!(
            sql.contains("authentication_code = CASE WHEN p.mask & 1 <> 0"),
            "{sql}"
        );
        assert!(!sql.contains("udf_string_2"), "{sql}");
        assert!(!sql.contains("custom_fields ="), "{sql}");
        assert!(!sql.contains("credit_card"), "{sql}");
    }

    #[test]
    fn custom_fields_are_cleared_removed_and_set_in_that_order() {
        let shape = Shape::of(&[CUSTOM_FIELDS_CLEAR_BIT, CUSTOM_FIELDS_REMOVE_BIT]);
        let fields = shape
            .new_custom_fields()
            .expect("rows change custom fields");
        assert!(
            fields.starts_with("(CASE WHEN p.mask & 524288 <> 0"),
            "{fields}"
        );
        assert!(fields.ends_with("- p.custom_fields_remove)"), "{fields}");
        assert_eq!(Shape::of(&[CODE_BIT]).new_custom_fields(), None);
    }

    #[test]
    fn a_row_that_specifies_nothing_changes_nothing() {
        assert_eq!(Shape::of(&[0]).is_changed(), "false");
        assert_eq!(Shape::of(&[0]).is_code_taken(), "false");
    }

    #[test]
    fn the_copy_names_the_columns_of_the_shape() {
        let sql = Shape::of(&[UDF_STRING_1_BIT | CUSTOM_FIELDS_SET_BIT]).copy_sql();
        assert_eq!(
            sql,
            "COPY tokensync_patch (idx, key_code, mask, udf_string_1, custom_fields_set) \
             FROM STDIN (FORMAT binary)"
        );
    }
}
