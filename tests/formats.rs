//! Files written by other tools: other physical types, column orders and spellings that the
//! contract allows must read the same as ours.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, DictionaryArray, Float64Array, Int32Array, Int64Array,
    LargeStringArray, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use tokenwatch::event::col;
use tokenwatch::ingest::{read_events, BadRowPolicy};

#[test]
fn parquet_with_other_types_reads_like_ours() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.parquet");
    let methods: DictionaryArray<Int32Type> = vec!["get", "POST", "GET"].into_iter().collect();
    let fields = vec![
        Field::new("extra", DataType::Int32, true),
        Field::new("status", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("token_id", DataType::LargeUtf8, false),
        Field::new("method", methods.data_type().clone(), false),
        Field::new("endpoint", DataType::Utf8, false),
        Field::new("bytes_out", DataType::Int32, false),
        Field::new("latency_ms", DataType::Float64, true),
        Field::new("src_ip", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, true),
        Field::new("asn", DataType::Utf8, true),
        Field::new("label", DataType::Boolean, true),
    ];
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(vec![1, 2, 3])),
        Arc::new(Int64Array::from(vec![200, 201, 700])),
        Arc::new(
            TimestampMicrosecondArray::from(vec![
                1_772_445_600_000_000,
                1_772_445_601_500_000,
                1_772_445_602_000_000,
            ])
            .with_timezone("UTC"),
        ),
        Arc::new(LargeStringArray::from(vec!["t1", "t2", "t3"])),
        Arc::new(methods),
        Arc::new(StringArray::from(vec!["/v1/a", "/v1/b", "/v1/c"])),
        Arc::new(Int32Array::from(vec![10, 20, 30])),
        Arc::new(Float64Array::from(vec![Some(1.5), None, Some(2.0)])),
        Arc::new(StringArray::from(vec![
            "10.0.0.1",
            "2001:db8::1",
            "10.0.0.2",
        ])),
        Arc::new(StringArray::from(vec![Some("de"), None, Some("US")])),
        Arc::new(StringArray::from(vec![Some("3320"), Some(""), None])),
        Arc::new(BooleanArray::from(vec![Some(false), Some(true), None])),
    ];
    let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let f = std::fs::File::create(&p).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, b.schema(), None).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();

    let (batches, rep) = read_events(&p, BadRowPolicy::Skip).unwrap();
    assert_eq!(rep.rows, 2, "{}", rep.summary());
    assert_eq!(rep.bad_rows, 1);
    assert_eq!(rep.first_errors[0].row, 3);
    assert_eq!(rep.first_errors[0].column, "status");
    let out = &batches[0];
    assert_eq!(out.schema(), tokenwatch::event::event_schema());
    let ts = out
        .column(col::TS)
        .as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(1), 1_772_445_601_500);
    assert_eq!(out.column(col::METHOD).as_string::<i32>().value(0), "GET");
    assert_eq!(out.column(col::COUNTRY).as_string::<i32>().value(0), "DE");
    assert_eq!(
        out.column(col::LABEL)
            .as_primitive::<arrow::datatypes::UInt8Type>()
            .value(1),
        1
    );
    // And the engine takes it.
    let mut e = tokenwatch::Engine::new(
        tokenwatch::Config::default(),
        tokenwatch::model::registry::Registry::default(),
    );
    e.apply(out).unwrap();
    assert_eq!(e.finish().len(), 2);
}

#[test]
fn csv_with_naive_times_float_numbers_and_shuffled_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.csv.gz");
    let text = "endpoint,src_ip,token_id,ts,method,status,bytes_out,asn\n\
                /v1/a,10.0.0.1,t1,2026-03-02 10:00:00,GET,200.0,12,3320\n\
                \"/v1/b,odd\",10.0.0.1,t1,2026-03-02T10:00:01.5,GET,404,0,\n";
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
    enc.finish().unwrap();
    let (batches, rep) = read_events(&p, BadRowPolicy::Fail).unwrap();
    assert_eq!(rep.rows, 2);
    let out = &batches[0];
    assert_eq!(
        out.column(col::ENDPOINT).as_string::<i32>().value(1),
        "/v1/b,odd"
    );
    let ts = out
        .column(col::TS)
        .as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(1) - ts.value(0), 1_500);
}
