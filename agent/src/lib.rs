//! cosmos-agent
