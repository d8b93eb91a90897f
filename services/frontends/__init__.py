"""What people and programs attach with: the client library (`client`, also `import voxpipe`),
the terminal chat and the Tk window.  The `voxpipe` command line itself is `voxpipe.cli`."""
