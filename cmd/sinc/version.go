package main

import (
	"encoding/json"
	"fmt"
	"io"

	"sinc.dev/sinc/internal/buildinfo"
)

// runVersion prints which build of sinc this is (`sinc version`, and
// `sinc --version`).
func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	in := buildinfo.Get()
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(in)
	}
	fmt.Fprint(stdout, in.String())
	return nil
}
