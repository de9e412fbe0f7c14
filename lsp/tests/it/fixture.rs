//! `$0` cursor fixtures: a text with one `$0` marking the cursor.

/// The text without the marker and the marker's byte offset.
pub fn cursor(fixture: &str) -> (String, usize) {
    let at = fixture.find("$0").expect("fixture has a $0 cursor");
    assert_eq!(fixture.matches("$0").count(), 1, "one $0 per fixture");
    (fixture.replacen("$0", "", 1), at)
}
