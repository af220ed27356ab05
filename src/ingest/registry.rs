//! Reader of the optional token registry (`token_id, owner, role, env, scopes, created_at,
//! expires_at`) in any of the contract's formats.

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Int64Type, TimeUnit};

use super::{BadRowPolicy, Error, RawReader, ReadReport, RowError};
use crate::model::registry::{Registry, RegistryEntry};

const COLS: [&str; 7] = [
    "token_id",
    "owner",
    "role",
    "env",
    "scopes",
    "created_at",
    "expires_at",
];

/// Read a registry file. Bad rows follow `policy` like events do.
pub fn read_registry(path: &Path, policy: BadRowPolicy) -> Result<(Registry, ReadReport), Error> {
    let mut raw = RawReader::open(path, &COLS)?;
    let mut reg = Registry::default();
    let mut report = ReadReport::default();
    let ps = path.display().to_string();
    while let Some((b, first)) = raw.next_batch()? {
        let schema = b.schema();
        if schema.index_of("token_id").is_err() {
            return Err(Error::MissingColumn {
                path: path.to_path_buf(),
                column: "token_id",
                found: schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let text = |name: &str| -> Result<Option<arrow::array::StringArray>, Error> {
            let Ok(i) = schema.index_of(name) else {
                return Ok(None);
            };
            let a = b.column(i);
            let a = match a.data_type() {
                DataType::Timestamp(_, _) => {
                    let ms = cast_with_options(
                        a,
                        &DataType::Timestamp(TimeUnit::Millisecond, None),
                        &CastOptions::default(),
                    )
                    .and_then(|a| cast_with_options(&a, &DataType::Int64, &CastOptions::default()))
                    .map_err(|e| Error::Format {
                        path: path.to_path_buf(),
                        reason: format!("column `{name}`: {e}"),
                    })?;
                    let ms = ms.as_primitive::<Int64Type>();
                    let s: arrow::array::StringArray =
                        ms.iter().map(|v| v.map(|v| v.to_string())).collect();
                    std::sync::Arc::new(s)
                }
                _ => {
                    cast_with_options(a, &DataType::Utf8, &CastOptions::default()).map_err(|e| {
                        Error::Format {
                            path: path.to_path_buf(),
                            reason: format!("column `{name}`: {e}"),
                        }
                    })?
                }
            };
            Ok(Some(a.as_string::<i32>().clone()))
        };
        let cols: Vec<Option<arrow::array::StringArray>> =
            COLS.iter().map(|c| text(c)).collect::<Result<_, _>>()?;
        let line_col = schema.index_of(super::validate::LINE_COLUMN).ok().map(|i| {
            b.column(i)
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .clone()
        });
        for i in 0..b.num_rows() {
            let get = |c: usize| -> &str {
                match &cols[c] {
                    Some(a) if a.is_valid(i) => a.value(i).trim(),
                    _ => "",
                }
            };
            let row = first + line_col.as_ref().map(|l| l.value(i)).unwrap_or(i as u64);
            let fail = |column: &str, reason: String| RowError {
                path: ps.clone(),
                row,
                column: column.into(),
                reason,
            };
            let parse_opt_ts = |c: usize| -> Result<Option<i64>, RowError> {
                let s = get(c);
                if s.is_empty() {
                    Ok(None)
                } else {
                    crate::event::parse_ts(s)
                        .map(Some)
                        .map_err(|e| fail(COLS[c], e))
                }
            };
            let res = (|| {
                let token = get(0);
                if token.is_empty() || token.len() > crate::event::MAX_TOKEN_ID_BYTES {
                    return Err(fail("token_id", "token_id must be 1..=256 bytes".into()));
                }
                let created_at = parse_opt_ts(5)?;
                let expires_at = parse_opt_ts(6)?;
                Ok(RegistryEntry::new(
                    token,
                    get(1),
                    get(2),
                    get(3),
                    get(4).split_whitespace(),
                    created_at,
                    expires_at,
                ))
            })();
            match res {
                Ok(e) => {
                    report.rows += 1;
                    reg.insert(e);
                }
                Err(e) if policy == BadRowPolicy::Fail => return Err(Error::BadRow(e)),
                Err(e) => report.push(e),
            }
        }
    }
    Ok((reg, report))
}
