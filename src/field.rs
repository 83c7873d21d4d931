//! The names of an access token's fields: the ones a row may update, and the ones a row's
//! result may hold (`fields_set`).

/// An updatable field of SPEC 1.2, other than `custom_field_set` and `fields_set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    AuthenticationCode,
    Identifier,
    PassCode,
    CardMaskedNumber,
    /// `udf_string_1` … `udf_string_8`, by 0-based index.
    UdfString(u8),
    /// `udf_float_1` … `udf_float_4`, by 0-based index.
    UdfFloat(u8),
    /// `udf_date_1` … `udf_date_4`, by 0-based index.
    UdfDate(u8),
}

const UDF_STRING_NAMES: [&str; 8] = [
    "udf_string_1",
    "udf_string_2",
    "udf_string_3",
    "udf_string_4",
    "udf_string_5",
    "udf_string_6",
    "udf_string_7",
    "udf_string_8",
];
const UDF_FLOAT_NAMES: [&str; 4] = ["udf_float_1", "udf_float_2", "udf_float_3", "udf_float_4"];
const UDF_DATE_NAMES: [&str; 4] = ["udf_date_1", "udf_date_2", "udf_date_3", "udf_date_4"];

impl Field {
    /// Parses a plain field name such as `udf_string_3`.
    pub fn parse(name: &str) -> Option<Field> {
        let field = match name {
            "authentication_code" => Field::AuthenticationCode,
            "identifier" => Field::Identifier,
            "pass_code" => Field::PassCode,
            "card_masked_number" => Field::CardMaskedNumber,
            _ => return udf_index(name),
        };
        Some(field)
    }

    /// The field's name, which is also its column in `access_tokens` (but for `pass_code`,
    /// stored as `pass_code_hash`).
    pub fn name(self) -> &'static str {
        match self {
            Field::AuthenticationCode => "authentication_code",
            Field::Identifier => "identifier",
            Field::PassCode => "pass_code",
            Field::CardMaskedNumber => "card_masked_number",
            Field::UdfString(i) => UDF_STRING_NAMES[usize::from(i)],
            Field::UdfFloat(i) => UDF_FLOAT_NAMES[usize::from(i)],
            Field::UdfDate(i) => UDF_DATE_NAMES[usize::from(i)],
        }
    }
}

fn udf_index(name: &str) -> Option<Field> {
    let position = |names: &[&str]| names.iter().position(|n| *n == name).map(|i| i as u8);
    if let Some(i) = position(&UDF_STRING_NAMES) {
        return Some(Field::UdfString(i));
    }
    if let Some(i) = position(&UDF_FLOAT_NAMES) {
        return Some(Field::UdfFloat(i));
    }
    position(&UDF_DATE_NAMES).map(Field::UdfDate)
}

/// A field that a row's result may hold, as named in `fields_set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultField {
    Id,
    ClassificationId,
    /// Any updatable field but `pass_code`, which a result never holds.
    Field(Field),
    CustomFieldSet,
    CreatedAt,
    UpdatedAt,
}

impl ResultField {
    /// Every field, in the order a result lists them when the row gave no `fields_set`.
    pub fn all() -> Vec<ResultField> {
        let mut fields = vec![
            ResultField::Id,
            ResultField::ClassificationId,
            ResultField::Field(Field::AuthenticationCode),
            ResultField::Field(Field::Identifier),
            ResultField::Field(Field::CardMaskedNumber),
        ];
        fields.extend((0..8).map(|i| ResultField::Field(Field::UdfString(i))));
        fields.extend((0..4).map(|i| ResultField::Field(Field::UdfFloat(i))));
        fields.extend((0..4).map(|i| ResultField::Field(Field::UdfDate(i))));
        fields.extend([
            ResultField::CustomFieldSet,
            ResultField::CreatedAt,
            ResultField::UpdatedAt,
        ]);
        fields
    }

    /// Parses a name of `fields_set`; `pass_code` and unknown names give `None`.
    pub fn parse(name: &str) -> Option<ResultField> {
        let field = match name {
            "id" => ResultField::Id,
            "classification_id" => ResultField::ClassificationId,
            "custom_field_set" => ResultField::CustomFieldSet,
            "created_at" => ResultField::CreatedAt,
            "updated_at" => ResultField::UpdatedAt,
            "pass_code" => return None,
            _ => ResultField::Field(Field::parse(name)?),
        };
        Some(field)
    }

    /// The name of the field in a result.
    pub fn name(self) -> &'static str {
        match self {
            ResultField::Id => "id",
            ResultField::ClassificationId => "classification_id",
            ResultField::Field(field) => field.name(),
            ResultField::CustomFieldSet => "custom_field_set",
            ResultField::CreatedAt => "created_at",
            ResultField::UpdatedAt => "updated_at",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for field in ResultField::all() {
            assert_eq!(ResultField::parse(field.name()), Some(field));
        }
        assert_eq!(Field::parse("udf_date_4"), Some(Field::UdfDate(3)));
        assert_eq!(Field::parse("udf_string_9"), None);
    }

    #[test]
    fn a_result_never_holds_the_pass_code() {
        assert_eq!(Field::parse("pass_code"), Some(Field::PassCode));
        assert_eq!(ResultField::parse("pass_code"), None);
    }
}
