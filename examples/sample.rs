//! A small file for the quickstart to complete in.

use std::collections::HashMap;

/// Counts how often each word occurs in `text`.
pub fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        
    }
    counts
}
