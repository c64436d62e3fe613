package config

import (
	"errors"
	"fmt"

	"github.com/BurntSushi/toml"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/policy"
)

// ParsePolicy checks the text of a cluster policy: a policy.toml an operator
// signs with `sinc ca policy`, or the body of a CA-signed policy document
// read back. It holds [[allow]] rules only, written as in an agent's config:
//
//	[[allow]]
//	from = "node-a/web"
//	to   = "node-b/db/pg"
//	uids = [1000]
//
// name names the text in errors (a file path, or where in the registry it
// came from); errors are *Error naming the field, as Parse's are. A text of
// no rules is a policy that allows nothing.
func ParsePolicy(name string, body []byte) (*policy.Policy, error) {
	if len(body) > cert.MaxPolicyBody {
		return nil, &Error{File: name, Err: fmt.Errorf("policy is %d bytes, more than %d", len(body), cert.MaxPolicyBody)}
	}
	md, top, err := parseTOML(name, body)
	if err != nil {
		return nil, err
	}
	var f struct {
		Allow []toml.Primitive `toml:"allow"`
	}
	if err := md.PrimitiveDecode(top, &f); err != nil {
		return nil, decodeError(name, err, nil)
	}
	allow, err := decodeAllow(name, md, f.Allow)
	if err != nil {
		return nil, err
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, &Error{File: name, Field: und[0].String(), Err: errors.New("unknown field: a cluster policy holds [[allow]] rules only")}
	}
	return allowPolicy(name, allow)
}
