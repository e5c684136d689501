//! A stand-in for the Cosmos Transfer model container (being built).
