//! cosmos-controller
