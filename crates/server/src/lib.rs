//! HTTP service. Filled by the server issue.
