//! Rows for a binary `COPY … FROM STDIN`, encoded in memory before they are sent.
//!
//! tokio-postgres's `BinaryCopyInWriter` hands the connection a message every 4 KiB, and
//! each message is a trip through a channel to the connection's task: for a chunk of
//! thousands of rows that costs more than the encoding. [`CopyRows`] encodes a whole chunk
//! into one buffer instead, with the same [`ToSql`] encoders, on whatever thread prepares
//! the chunk (off the async workers, while the database works on the chunk before), and
//! [`CopyRows::send`] gives it to the server in one piece. It remembers where each row
//! starts, so that a part of the rows can be sent.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::Transaction;
use tokio_postgres::types::{IsNull, ToSql, Type};

/// The signature, flags and header extension length that open a binary COPY stream.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The field count that ends a binary COPY stream.
const TRAILER: &[u8] = &(-1i16).to_be_bytes();

/// Encoded rows of one table, in the order they were pushed.
#[derive(Debug, Default, Clone)]
pub struct CopyRows {
    data: BytesMut,
    /// Where each row's bytes start in `data`.
    starts: Vec<usize>,
}

impl CopyRows {
    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Encodes one row: `values[i]` as a value of `types[i]`.
    ///
    /// # Panics
    /// When the lists differ in length, or a value refuses its type: both are mistakes of
    /// the caller, whose columns are fixed.
    pub fn push(&mut self, types: &[Type], values: &[&(dyn ToSql + Sync)]) {
        assert_eq!(types.len(), values.len(), "one value per column");
        self.starts.push(self.data.len());
        let count = i16::try_from(values.len()).expect("a table has fewer than 32,768 columns");
        self.data.put_i16(count);
        for (value, ty) in values.iter().zip(types) {
            let at = self.data.len();
            self.data.put_i32(0);
            let is_null = value
                .to_sql_checked(ty, &mut self.data)
                .unwrap_or_else(|error| panic!("a value of type {ty} cannot be encoded: {error}"));
            let len = match is_null {
                IsNull::Yes => -1,
                IsNull::No => {
                    let len = self.data.len() - at - 4;
                    i32::try_from(len).expect("a value is smaller than 2 GiB")
                }
            };
            self.data[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// The rows at the positions `picked` (ascending), as a new set.
    pub fn pick(&self, picked: &[usize]) -> CopyRows {
        let mut rows = CopyRows::default();
        for &n in picked {
            rows.starts.push(rows.data.len());
            rows.data.extend_from_slice(&self.data[self.row_range(n)]);
        }
        rows
    }

    fn row_range(&self, n: usize) -> std::ops::Range<usize> {
        let end = self.starts.get(n + 1).copied().unwrap_or(self.data.len());
        self.starts[n]..end
    }

    /// Runs `copy_sql` (a `COPY … FROM STDIN (FORMAT binary)`) and sends every row.
    ///
    /// # Errors
    /// When the server refuses the statement or a row.
    pub async fn send(
        &self,
        tx: &Transaction<'_>,
        copy_sql: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        use futures_util::SinkExt as _;
        let sink = tx.copy_in::<_, Bytes>(copy_sql).await?;
        let mut sink = std::pin::pin!(sink);
        sink.feed(Bytes::from_static(HEADER)).await?;
        // A copy of the rows, so a chunk can be sent again after a rollback: a memcpy of a
        // megabyte or two, next to the server's work on them.
        sink.feed(Bytes::copy_from_slice(&self.data)).await?;
        sink.feed(Bytes::from_static(TRAILER)).await?;
        sink.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_holds_its_field_count_then_each_length_and_value() {
        let mut rows = CopyRows::default();
        let name: Option<&str> = None;
        rows.push(
            &[Type::INT4, Type::TEXT, Type::TEXT],
            &[&7i32, &"ab", &name],
        );
        let expected: &[u8] = &[
            0, 3, // three fields
            0, 0, 0, 4, 0, 0, 0, 7, // 7 as int4
            0, 0, 0, 2, b'a', b'b', // "ab"
            0xff, 0xff, 0xff, 0xff, // null
        ];
        assert_eq!(&rows.data[..], expected);
    }

    #[test]
    fn picking_keeps_the_chosen_rows_whole_and_in_order() {
        let mut rows = CopyRows::default();
        for n in 0..4i32 {
            let text = "x".repeat(n as usize);
            rows.push(&[Type::INT4, Type::TEXT], &[&n, &text]);
        }
        let picked = rows.pick(&[1, 3]);
        assert_eq!(picked.len(), 2);
        let mut expected = CopyRows::default();
        expected.push(&[Type::INT4, Type::TEXT], &[&1i32, &"x"]);
        expected.push(&[Type::INT4, Type::TEXT], &[&3i32, &"xxx"]);
        assert_eq!(picked.data, expected.data);
        assert_eq!(picked.starts, expected.starts);
    }
}
