//go:build dynamig_unsafe

package guard

import (
	"os"
	"slices"
	"strings"
)

var off = map[string]bool{}

func init() {
	for _, name := range strings.Split(os.Getenv("DYNAMIG_GUARDS_OFF"), ",") {
		if name == "" {
			continue
		}
		if !slices.Contains(All, name) {
			panic("DYNAMIG_GUARDS_OFF: unknown guard " + name + " (known: " + strings.Join(All, ", ") + ")")
		}
		off[name] = true
	}
}

// Off reports whether DYNAMIG_GUARDS_OFF names the guard. Only binaries
// built with -tags dynamig_unsafe have this; they are for the soak.
func Off(name string) bool { return off[name] }
