"""Several processes and sharded models, one mechanism per module: callers import the module they use, and this
package's face hands on no names."""
