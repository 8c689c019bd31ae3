import type { Access, Grant } from '../config.ts';

/** What a call needs: to read, or to write (which only 'read-write' grants). */
export type Need = 'read' | 'write';

/** The grant that decides an instance name's access, or undefined when none matches. */
export interface GrantMatch {
  readonly instancePrefix: string;
  readonly access: Access;
}

/**
 * One identity's grants, looked up by instance name. Prefixes are whole
 * segments: "" matches every instance name, "a/b" matches "a/b" and
 * "a/b/c" but not "a/bc". The longest matching prefix decides, so a
 * narrower grant can take access away as well as add it
 * (`{"": "read-write", "release": "read"}`: everything writable but release/...).
 *
 * The lookup walks the name's own prefixes from the longest ("a/b/c",
 * "a/b", "a", "") and stops at the first one granted: one Map lookup per
 * segment, whatever the number of grants.
 */
export class Grants {
  readonly #byPrefix: ReadonlyMap<string, Access>;

  constructor(grants: readonly Grant[]) {
    this.#byPrefix = new Map(grants.map((g) => [g.instancePrefix, g.access]));
  }

  /** The grant deciding `instanceName`, or undefined. */
  match(instanceName: string): GrantMatch | undefined {
    let prefix = instanceName;
    for (;;) {
      const access = this.#byPrefix.get(prefix);
      if (access !== undefined) return { instancePrefix: prefix, access };
      if (prefix === '') return undefined;
      const slash = prefix.lastIndexOf('/');
      prefix = slash < 0 ? '' : prefix.slice(0, slash);
    }
  }

  /** Whether `need` is allowed on `instanceName`. */
  allows(instanceName: string, need: Need): boolean {
    return permits(this.match(instanceName), need);
  }
}

export function permits(match: GrantMatch | undefined, need: Need): boolean {
  if (match === undefined) return false;
  return need === 'read' || match.access === 'read-write';
}
