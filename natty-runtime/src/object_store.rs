//! Object stores: declarations that natty provisions, and streaming access to large objects.
