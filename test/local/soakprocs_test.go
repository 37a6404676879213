package local

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A fake dynamig-local that prints what a soak process prints for the
// seeds it is given: seed 3 has a violation, seed 5 makes it fail
// before its summary.
const fakeSoak = `#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --soak) runs=$2; shift ;;
    --soak-seed) seed=$2; shift ;;
  esac
  shift
done
failed=0
i=0
while [ $i -lt $runs ]; do
  s=$((seed + i))
  i=$((i + 1))
  if [ $s -eq 5 ]; then echo "dynamig-local: run $i (seed 5): boom" >&2; exit 1; fi
  if [ $s -eq 3 ]; then
    echo "run $i/$runs seed $s: 2 pods, 1.0s: 1 VIOLATIONS"
    echo "  violation (seed 3): pod x failed"
    failed=1
  else
    echo "run $i/$runs seed $s: 2 pods, 1.0s: ok"
  fi
done
echo "soak: $((runs - failed)) passed, $failed failed"
exit $failed
`

func TestSoakInProcesses(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "fake-dynamig-local")
	if err := os.WriteFile(exe, []byte(fakeSoak), 0o755); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	v, err := SoakInProcesses(context.Background(), exe, nil, "", 4, 1, 2, &out)
	if err != nil || v != 1 {
		t.Fatalf("seeds 1–4 in 2 processes: %d violations, %v; want 1, nil\n%s", v, err, out.String())
	}
	for _, want := range []string{"[1] seeds 1–2", "[2] seeds 3–4", "[2]   violation (seed 3): pod x failed", "4 of 4 runs (seeds 1–4) in 2 processes, 1 violations", "soak: 3 passed, 1 failed"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}

	out.Reset()
	v, err = SoakInProcesses(context.Background(), exe, nil, "", 6, 1, 3, &out)
	if err == nil || !strings.Contains(err.Error(), "soak process 3 (seeds 5–6)") {
		t.Fatalf("seeds 1–6, seed 5 failing: %d violations, %v; want soak process 3's error\n%s", v, err, out.String())
	}
	if !strings.Contains(out.String(), "4 of 6 runs") {
		t.Errorf("output does not say 4 of 6 runs finished:\n%s", out.String())
	}
}
