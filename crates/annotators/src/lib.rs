//! Condition preprocessors (annotators). Filled by the conditions issue.
