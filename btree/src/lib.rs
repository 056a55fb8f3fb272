//! ubcache's btree of extent keys.
