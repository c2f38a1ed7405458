package config

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestEnvInLeftOutValue: a malformed reference is reported even in a value
// that decoding left out because of another problem, each at its element.
func TestEnvInLeftOutValue(t *testing.T) {
	es := wantError(t, "[kafka]\ntopics = [\"${ORDERLY_TEST\", 2]\n"+minimal,
		`t.toml:2:29: kafka.topics[1]: must be a string, not a TOML integer`,
		`t.toml:2:11: kafka.topics[0]: malformed environment reference "${ORDERLY_TEST"`)
	if len(es) != 2 {
		t.Errorf("%d errors, want 2:\n%v", len(es), es)
	}
}

// TestEnvInDuration: a duration's references count for UnsetEnv and for
// the notes of its problems like any string's.
func TestEnvInDuration(t *testing.T) {
	os.Unsetenv("ORDERLY_TEST_UNSET")
	t.Setenv("ORDERLY_TEST_EMPTY", "")
	c := mustParse(t, "[dispatch]\nlane_idle = \"${ORDERLY_TEST_UNSET}5s\"\n"+minimal)
	if c.Dispatch.LaneIdle.D().String() != "5s" || !slices.Equal(c.UnsetEnv, []string{"ORDERLY_TEST_UNSET"}) {
		t.Errorf("lane_idle %v, UnsetEnv %v", c.Dispatch.LaneIdle, c.UnsetEnv)
	}
	wantError(t, "[dispatch]\ndrain_timeout = \"${ORDERLY_TEST_EMPTY}-1s\"\n"+minimal,
		`t.toml:2:1: dispatch.drain_timeout: must not be negative, not -1s (the environment variable ORDERLY_TEST_EMPTY is empty)`)
}

// TestDottedKeyPositions: a dotted key is placed where it starts, the
// tables it implies at their own part; a problem with an absent key goes
// to the nearest of them.
func TestDottedKeyPositions(t *testing.T) {
	_, err := Parse([]byte("http.retry.max_backoff = \"1ms\"\n"+minimal), "t.toml", func(c *Config) error {
		return c.ErrorAt("http.retry.max_attempts", errors.New("probe"))
	})
	for _, w := range []string{
		"t.toml:1:1: http.retry.max_backoff: 1ms is less than http.retry.initial_backoff (100ms)",
		"t.toml:1:6: http.retry.max_attempts: probe",
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in:\n%v", w, err)
		}
	}
}

// TestDeepKeys: keys far deeper than the schema are reported, not followed
// (a walk over every prefix would take quadratic time).
func TestDeepKeys(t *testing.T) {
	deep := strings.Repeat("a.", 20000)
	wantError(t, deep+"b = 1\n["+deep+"c]\nd = 1\n"+minimal, "t.toml:1:1: a.a.a")
}
